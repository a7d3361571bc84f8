"""Request validation (gateway/api/protocol.py): what is accepted, and every error path's
status and `param`. Pure functions: no engine, no HTTP."""

import pytest

from gateway.api import protocol as P
from gateway.api import responses as R
from gateway.api.errors import APIError
from gateway.engine.errors import RequestRejectedError, check_context_length

INFO = P.ModelInfo(name="m", vocab_size=100, max_model_len=64)
MSG = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return P.parse_chat({"model": "m", "messages": MSG, **fields}, INFO)


def completion(**fields):
    return P.parse_completion({"model": "m", "prompt": "hi", **fields}, INFO)


def error_of(fn, **fields) -> APIError:
    with pytest.raises(APIError) as info:
        fn(**fields)
    return info.value


# ---- accepted requests ------------------------------------------------------------------

def test_chat_defaults_leave_max_tokens_open_and_sampling_default():
    req = chat()
    assert (req.max_tokens, req.n, req.stream, req.include_usage) == (None, 1, False, False)
    assert req.params.logprobs is None and req.params.temperature == 1.0
    assert req.messages == MSG


def test_content_parts_are_joined_and_developer_becomes_system():
    req = P.parse_chat({"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}, INFO)
    assert req.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]


def test_sampling_fields_reach_sampling_params():
    req = chat(temperature=0, top_p=0.5, top_k=-1, min_p=0.1, presence_penalty=1, frequency_penalty=-1,
               repetition_penalty=1.2, seed=3, stop="x", stop_token_ids=[5], logit_bias={"7": 2},
               ignore_eos=True, min_tokens=2, max_tokens=9, logprobs=True, top_logprobs=3)
    p = req.params
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (0.0, 0.5, 0, 0.1)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (1.0, -1.0, 1.2)
    assert (p.seed, p.stop, p.stop_token_ids, p.logit_bias) == (3, ["x"], [5], {7: 2.0})
    assert (p.ignore_eos, p.min_tokens, p.logprobs, req.max_tokens) == (True, 2, 3, 9)


def test_max_completion_tokens_wins_and_may_equal_max_tokens():
    assert chat(max_completion_tokens=5).max_tokens == 5
    assert chat(max_completion_tokens=5, max_tokens=5).max_tokens == 5


def test_logprobs_true_without_top_logprobs_asks_for_zero_alternatives():
    assert chat(logprobs=True).params.logprobs == 0
    assert chat(logprobs=False).params.logprobs is None


def test_metadata_fields_and_null_unsupported_fields_are_accepted():
    req = chat(user="u", metadata={"k": "v"}, store=False, tools=None, response_format=None)
    assert req.n == 1


def test_stream_options_include_usage():
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage is True


@pytest.mark.parametrize("prompt, expected", [
    ("text", ["text"]),
    ([1, 2, 3], [[1, 2, 3]]),
    (["a", "b"], ["a", "b"]),
    ([[1], [2, 3]], [[1], [2, 3]]),
])
def test_completion_prompt_forms(prompt, expected):
    assert completion(prompt=prompt).prompts == expected


def test_completion_echo_logprobs_best_of_equal_n_and_empty_suffix():
    req = completion(echo=True, best_of=2, n=2, suffix="")
    assert (req.echo, req.n) == (True, 2)
    assert completion(logprobs=2).params.logprobs == 2


def test_finalize_fills_the_context_and_offsets_the_seed():
    req = chat(seed=10)
    params = P.finalize_params(req, 2, prompt_len=14, info=INFO, prompt_param="messages")
    assert (params.max_tokens, params.seed) == (50, 12)
    assert P.finalize_params(chat(), 1, 14, INFO, "messages").seed is None


def test_finalize_accepts_exactly_the_context():
    assert P.finalize_params(chat(max_tokens=4), 0, 60, INFO, "messages").max_tokens == 4


# ---- rejected requests: status and param ------------------------------------------------

CHAT_ERRORS = [
    (dict(model="other"), 404, "model"),
    (dict(tools=[{"type": "function"}]), 400, "tools[0]"),
    (dict(tool_choice="auto"), 400, "tool_choice"),           # without tools
    (dict(guided_choice=[]), 400, "guided_choice"),
    (dict(functions=[]), 400, "functions"),
    (dict(parallel_tool_calls="no"), 400, "parallel_tool_calls"),
    (dict(modalities=["text"]), 400, "modalities"),
    (dict(frobnicate=1), 400, "frobnicate"),
    (dict(echo=True), 400, "echo"),                      # a completions-only field
    (dict(store=True), 400, "store"),
    (dict(user=5), 400, "user"),
    (dict(messages=[]), 400, "messages"),
    (dict(messages="hi"), 400, "messages"),
    (dict(messages=["hi"]), 400, "messages[0]"),
    (dict(messages=[{"role": "tool", "content": "x"}]), 400, "messages[0].tool_call_id"),
    (dict(messages=[{"role": "critic", "content": "x"}]), 400, "messages[0].role"),
    (dict(messages=[{"role": "user", "content": None}]), 400, "messages[0].content"),
    (dict(messages=[{"role": "user", "content": "x", "name": "bob"}]), 400, "messages[0].name"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), 400,
     "messages[0].content[0]"),
    (dict(temperature="hot"), 400, "temperature"),
    (dict(temperature=-1), 400, "temperature"),
    (dict(temperature=True), 400, "temperature"),
    (dict(top_p=0), 400, "top_p"),
    (dict(top_k=-2), 400, "top_k"),
    (dict(top_k=1.5), 400, "top_k"),
    (dict(min_p=2), 400, "min_p"),
    (dict(presence_penalty=3), 400, "presence_penalty"),
    (dict(frequency_penalty=-3), 400, "frequency_penalty"),
    (dict(repetition_penalty=0), 400, "repetition_penalty"),
    (dict(max_tokens=0), 400, "max_tokens"),
    (dict(max_tokens="5"), 400, "max_tokens"),
    (dict(max_completion_tokens=0), 400, "max_completion_tokens"),
    (dict(max_tokens=4, max_completion_tokens=5), 400, "max_tokens"),
    (dict(n=0), 400, "n"),
    (dict(n=P.MAX_CHOICES + 1), 400, "n"),
    (dict(seed=2**63), 400, "seed"),
    (dict(seed="1"), 400, "seed"),
    (dict(stop=[""]), 400, "stop"),
    (dict(stop=[1]), 400, "stop"),
    (dict(stop=["s"] * (P.MAX_STOP + 1)), 400, "stop"),
    (dict(stop_token_ids=[100]), 400, "stop_token_ids"),
    (dict(logit_bias={"abc": 1}), 400, "logit_bias"),
    (dict(logit_bias={"100": 1}), 400, "logit_bias"),
    (dict(logit_bias={"-1": 1}), 400, "logit_bias"),
    (dict(logit_bias={"5_0": 1}), 400, "logit_bias"),
    (dict(logit_bias={"5": 101}), 400, "logit_bias"),
    (dict(logit_bias={"5": "x"}), 400, "logit_bias"),
    (dict(min_tokens=10, max_tokens=5), 400, "min_tokens"),
    (dict(logprobs=1), 400, "logprobs"),
    (dict(top_logprobs=2), 400, "top_logprobs"),            # without logprobs=true
    (dict(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    (dict(stream_options={"include_usage": True}), 400, "stream_options"),   # without stream
    (dict(stream=True, stream_options={"other": 1}), 400, "stream_options"),
    (dict(stream=True, stream_options={"include_usage": "yes"}), 400, "stream_options.include_usage"),
    (dict(stream="yes"), 400, "stream"),
]


@pytest.mark.parametrize("fields, status, param", CHAT_ERRORS)
def test_chat_rejections_name_the_parameter(fields, status, param):
    error = error_of(chat, **fields)
    assert (error.status, error.param) == (status, param), error.message


def test_unknown_model_is_a_404_with_model_not_found():
    error = error_of(chat, model="gpt-4")
    assert (error.status, error.type, error.code) == (404, "NotFoundError", "model_not_found")
    assert error.body() == {"error": {"message": error.message, "type": "NotFoundError",
                                      "param": "model", "code": "model_not_found"}}


COMPLETION_ERRORS = [
    (dict(prompt=None), 400, "prompt"),
    (dict(prompt=[]), 400, "prompt"),
    (dict(prompt=5), 400, "prompt"),
    (dict(prompt=[1, 100]), 400, "prompt"),
    (dict(prompt=[[1], []]), 400, "prompt"),
    (dict(prompt=["a", 3.5]), 400, "prompt"),
    (dict(prompt=["a"] * 65, n=2), 400, "prompt"),           # too many choices in all
    (dict(suffix="tail"), 400, "suffix"),
    (dict(best_of=3), 400, "best_of"),
    (dict(echo=True, logprobs=1), 400, "echo"),
    (dict(logprobs=True), 400, "logprobs"),
    (dict(logprobs=21), 400, "logprobs"),
    (dict(echo="yes"), 400, "echo"),
    (dict(messages=MSG), 400, "messages"),                  # a chat-only field
    (dict(max_completion_tokens=3), 400, "max_completion_tokens"),
    (dict(logits_processors=["x"]), 400, "logits_processors"),
]


@pytest.mark.parametrize("fields, status, param", COMPLETION_ERRORS)
def test_completion_rejections_name_the_parameter(fields, status, param):
    error = error_of(completion, **fields)
    assert (error.status, error.param) == (status, param), error.message


def test_completion_requires_a_prompt():
    with pytest.raises(APIError) as info:
        P.parse_completion({"model": "m"}, INFO)
    assert (info.value.status, info.value.param) == (400, "prompt")


def test_context_overflow_is_left_to_the_engine_check_which_gives_both_numbers():
    params = P.finalize_params(chat(max_tokens=10), 0, prompt_len=60, info=INFO, prompt_param="messages")
    assert params.max_tokens == 10   # no second check here: the engine's admission is the one
    with pytest.raises(RequestRejectedError) as info:
        check_context_length(INFO.max_model_len, 60, params.max_tokens)
    error = info.value
    assert (error.param, error.code) == ("max_tokens", "context_length_exceeded")
    assert "64" in str(error) and "60 in the prompt" in str(error) and "10 for the completion" in str(error)


def test_prompt_filling_the_context_leaves_one_token_which_the_engine_check_refuses():
    params = P.finalize_params(chat(), 0, prompt_len=64, info=INFO, prompt_param="messages")
    assert params.max_tokens == 1
    with pytest.raises(RequestRejectedError):
        check_context_length(INFO.max_model_len, 64, params.max_tokens)


def test_min_tokens_above_the_default_max_tokens_is_rejected_after_tokenization():
    req = chat(min_tokens=20)
    with pytest.raises(APIError) as info:
        P.finalize_params(req, 0, prompt_len=50, info=INFO, prompt_param="messages")
    assert info.value.param == "min_tokens"


def test_empty_prompt_is_rejected():
    with pytest.raises(APIError) as info:
        P.finalize_params(completion(prompt=""), 0, prompt_len=0, info=INFO, prompt_param="prompt")
    assert (info.value.status, info.value.param) == (400, "prompt")


# ---- response objects -------------------------------------------------------------------

def test_chat_logprobs_shape_and_infinite_values_are_clamped():
    from gateway.engine.messages import TokenLogprob
    out = R.chat_logprobs([TokenLogprob(65, float("-inf"), [(65, -0.1), (66, -2.0)])], chr)
    assert out == {"content": [{"token": "A", "logprob": -9999.0, "bytes": [65], "top_logprobs": [
        {"token": "A", "logprob": -0.1, "bytes": [65]}, {"token": "B", "logprob": -2.0, "bytes": [66]}]}]}


def test_completion_logprobs_offsets_continue_from_the_start():
    from gateway.engine.messages import TokenLogprob
    out, end = R.completion_logprobs([TokenLogprob(65, -1.0, []), TokenLogprob(66, -2.0, [(66, -2.0)])], chr, 3)
    assert out == {"tokens": ["A", "B"], "token_logprobs": [-1.0, -2.0], "top_logprobs": [{}, {"B": -2.0}],
                   "text_offset": [3, 4]}
    assert end == 5
