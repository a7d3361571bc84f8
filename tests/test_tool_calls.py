"""Tool calling (api/tools.py → the grammar → api/tool_calls.py → tool_shape.py): request
parsing and its 400s, rendering tool messages for the template, the incremental parser
(any split of a reply parses to the same calls), then the official `openai` client against a
real in-process server on the default model (SmolLM2, whose template has no tools variable):
required and named choices always produce calls whose arguments validate (non-streamed and
streamed with the SDK's own accumulator, temperature 1.0 over several seeds), streamed calls
reassemble to exactly the non-streamed ones, `none` answers in text, a tool-result turn is
rendered and answered, and bad tools are 400s naming the field. Plus guided_choice and
guided_grammar, SamplingParams(choice=..., grammar=...) in the Python API, and a template that
reads `tools` rendering them itself."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from gateway.api import protocol as P
from gateway.api import tools as T
from gateway.api.errors import APIError
from gateway.api.tool_calls import ToolCallParser, parse
from live_server import LiveServer

INFO = P.ModelInfo(name="m", vocab_size=49152, max_model_len=512)
MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}}}
ADD = {"type": "object", "required": ["a", "b"], "additionalProperties": False,
       "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
TOOLS = [{"type": "function", "function": {"name": name, "description": f"the {name} function", "strict": True,
                                           "parameters": schema}} for name, schema in SCHEMAS.items()]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
SEEDS = (1, 2, 3)
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"celsius"}'}}
ROUND_TRIP = ASK + [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "sunny"}'}]


def chat(**fields):
    return P.parse_chat({"model": "m", "messages": ASK, **fields}, INFO)


# ---- parsing -----------------------------------------------------------------------------

def test_tools_parse_into_a_spec_and_a_grammar():
    req = chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert [t.name for t in req.tools.tools] == ["get_weather", "add"]
    assert (req.tools.choice, req.tools.parallel, req.tools.forced) == ("required", False, True)
    assert req.params.grammar == req.tools.grammar() and "<tool_call>" in req.params.grammar
    assert chat(tools=TOOLS).tools.choice == "auto"
    named = chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}})
    assert named.tools.choice == "add" and "get_weather" not in named.params.grammar
    none = chat(tools=TOOLS, tool_choice="none")
    assert not none.tools.active and none.params.grammar is None


@pytest.mark.parametrize("fields, param, says", [
    (dict(tools={"name": "f"}), "tools", "array"),
    (dict(tools=[]), "tools", "array"),
    (dict(tools=[{"type": "function", "function": {"description": "no name"}}]), "tools[0].function.name", "name"),
    (dict(tools=[{"type": "function", "function": {"name": "has space"}}]), "tools[0].function.name", "letters"),
    (dict(tools=[{"type": "retrieval"}]), "tools[0]", "function"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}]),
     "tools[0].function.parameters", "Invalid type: foo"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]),
     "tools[0].function.parameters", "schema"),
    (dict(tools=TOOLS + TOOLS[:1]), "tools", "twice"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "description": "x" * 70_000}}]), "tools", "bytes"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice", "nope"),
    (dict(tools=TOOLS, tool_choice="always"), "tool_choice", "must be one of"),
    (dict(tool_choice="required"), "tool_choice", "tools"),
    (dict(tools=TOOLS, parallel_tool_calls=1), "parallel_tool_calls", "boolean"),
    (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "response_format",
     "tool calling"),
    (dict(messages=[{"role": "tool", "content": "21"}]), "messages[0].tool_call_id", "tool_call_id"),
    (dict(messages=[{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {}}}]}]),
     "messages[0].tool_calls[0]", "arguments"),
    (dict(messages=[{"role": "user", "content": "x", "tool_calls": [CALL]}]), "messages[0].tool_calls", "unsupported"),
])
def test_bad_tools_are_400s_naming_the_field(fields, param, says):
    with pytest.raises(APIError) as info:
        chat(**fields)
    assert (info.value.status, info.value.param) == (400, param), info.value.message
    assert says in info.value.message


def test_guided_choice_and_grammar_become_constraints():
    assert chat(guided_choice=["yes", "no"]).params.choice == ["yes", "no"]
    assert chat(guided_grammar='root ::= "a" "b"').params.grammar == 'root ::= "a" "b"'
    for fields, param in ((dict(guided_choice=["a", ""]), "guided_choice"), (dict(guided_grammar="start: x"),
                                                                             "guided_grammar"),
                          (dict(guided_choice=["a"], guided_regex="a"), "guided_choice")):
        with pytest.raises(APIError) as info:
            chat(**fields)
        assert info.value.param == param, info.value.message


# ---- rendering ---------------------------------------------------------------------------

def test_a_template_without_tools_gets_a_preamble_and_text_turns():
    req = chat(messages=ROUND_TRIP, tools=TOOLS)
    messages, passed = T.render(req.messages, req.tools, uses_tools=False)
    assert passed is None and messages[0]["role"] == "system" and '"name": "get_weather"' in messages[0]["content"]
    assert messages[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": '
                                                           '{"city": "Paris", "unit": "celsius"}}\n</tool_call>'}
    assert messages[3]["role"] == "user" and "<tool_response>" in messages[3]["content"]
    no_tools, _ = T.render(req.messages, None, uses_tools=False)
    assert no_tools[0] == ASK[0]   # tool messages still render, without a preamble


def test_a_template_with_tools_gets_them_and_structured_calls():
    req = chat(messages=ROUND_TRIP, tools=TOOLS)
    messages, passed = T.render(req.messages, req.tools, uses_tools=True)
    assert [t["function"]["name"] for t in passed] == ["get_weather", "add"]
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "unit": "celsius"}
    assert messages[2] == {"role": "tool", "content": ROUND_TRIP[2]["content"], "tool_call_id": "call_1",
                           "name": "get_weather"}
    assert T.template_uses_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert not T.template_uses_tools("{% for message in messages %}{{ message['content'] }}{% endfor %}")


# ---- the output parser -------------------------------------------------------------------

REPLY = ('<tool_call>\n{"name":"get_weather","arguments":{"city":"Pa\\"}ris","n":[1,{"a":2}]}}\n</tool_call>\n'
         '<tool_call>\n{"name":"add","arguments":{"a":1,"b":-2}}\n</tool_call>')


@pytest.mark.parametrize("step", [1, 2, 3, 5, 8, len(REPLY)])
def test_any_split_parses_to_the_same_calls(step):
    parser, arguments = ToolCallParser(), {}
    for i in range(0, len(REPLY), step):
        for event in parser.feed(REPLY[i:i + step]):
            assert event.kind != "content"
            if event.kind == "arguments":
                arguments[event.index] = arguments.get(event.index, "") + event.text
    parser.finish()
    assert [(c.name, c.arguments) for c in parser.calls] == [
        ("get_weather", '{"city":"Pa\\"}ris","n":[1,{"a":2}]}'), ("add", '{"a":1,"b":-2}')]
    assert arguments == {0: parser.calls[0].arguments, 1: parser.calls[1].arguments}
    assert parser.content == ""


@pytest.mark.parametrize("text, content, calls", [
    ("Hello <tool_call> there", "Hello <tool_call> there", []),
    ("  <tool_c", "  <tool_c", []),
    ('<tool_call>\n{"arguments": {"x": 1}, "name": "g"}\n</tool_call>', None, [("g", '{"x": 1}')]),
    ('<tool_call>\n{"name": "g", "parameters": {}}\n</tool_call>', None, [("g", "{}")]),
    ('<tool_call>\n{"name":"g","arguments":{"a":', None, [("g", '{"a":')]),   # cut off by max_tokens
    ("<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", []),
])
def test_replies_that_are_not_clean_calls(text, content, calls):
    got_content, got = parse(text)
    assert (got_content, [(c.name, c.arguments) for c in got]) == (content, calls)


# ---- against a live server on the default model ------------------------------------------

@pytest.fixture(scope="module")
def live():
    with LiveServer(model=None, num_kv_blocks=192, block_size=16, max_model_len=1024) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _valid(calls, allowed: set[str]) -> list[tuple[str, str]]:
    assert calls, "no tool calls"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    return [(c.function.name, c.function.arguments) for c in calls]


def test_required_and_named_choices_always_call_valid_tools(client):
    for seed in SEEDS:
        for choice, allowed in (("required", set(SCHEMAS)), ({"type": "function", "function": {"name": "add"}},
                                                              {"add"})):
            r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice,
                                               temperature=1.0, seed=seed, max_tokens=120)
            message = r.choices[0].message
            assert r.choices[0].finish_reason == "tool_calls" and message.content is None
            _valid(message.tool_calls, allowed)
            if choice != "required":
                assert len(message.tool_calls) == 1


def test_streamed_calls_reassemble_to_the_non_streamed_ones(client):
    for seed, choice in ((1, "required"), (2, {"type": "function", "function": {"name": "get_weather"}})):
        fields = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=0, seed=seed,
                      max_tokens=120)
        plain = client.chat.completions.create(**fields).choices[0]
        with client.chat.completions.stream(**fields) as stream:   # the SDK's own delta accumulator
            for _ in stream:
                pass
            streamed = stream.get_final_completion().choices[0]
        assert streamed.finish_reason == plain.finish_reason == "tool_calls"
        assert _valid(streamed.message.tool_calls, set(SCHEMAS)) == _valid(plain.message.tool_calls, set(SCHEMAS))
        for call in streamed.message.tool_calls:   # the SDK parsed the strict tools' arguments itself
            assert call.function.parsed_arguments == json.loads(call.function.arguments)


def test_streamed_deltas_have_the_openai_shape(client):
    firsts, fragments = [], 0
    for chunk in client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, stream=True, max_tokens=120,
                                                tool_choice="required", parallel_tool_calls=False, temperature=0):
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                if call.id is not None:
                    firsts.append(call)
                    assert call.type == "function" and call.function.name in SCHEMAS
                else:
                    fragments += 1
                    assert call.function.name is None and call.function.arguments
    assert len(firsts) == 1 and firsts[0].index == 0 and fragments >= 2   # arguments arrive as they are written


def test_auto_answers_in_text_or_valid_calls_and_none_in_text(client):
    for seed in SEEDS:
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, temperature=1.0, seed=seed,
                                           max_tokens=60)
        message = r.choices[0].message
        if message.tool_calls:
            _valid(message.tool_calls, set(SCHEMAS))
        else:
            assert message.content and "<tool_call>" not in message.content
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=30,
                                       temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


def test_a_tool_result_turn_is_rendered_and_answered(live, client):
    import httpx
    tokens = httpx.post(live.url + "/tokenize", json={"messages": ROUND_TRIP}).json()["tokens"]
    prompt = live.engine.decode(tokens)
    assert '<tool_response>\n{"temperature": 21, "sky": "sunny"}\n</tool_response>' in prompt
    assert '"name": "get_weather"' in prompt
    r = client.chat.completions.create(model=MODEL, messages=ROUND_TRIP, tools=TOOLS, tool_choice="none",
                                       max_tokens=30, temperature=0)
    assert r.choices[0].message.content and r.choices[0].message.tool_calls is None


def test_bad_tools_over_http_are_400s(client):
    bad = [(dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "foo"}}}]),
            "tools[0].function.parameters"),
           (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
           (dict(tools="get_weather"), "tools")]
    for fields, param in bad:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, **fields)
        assert info.value.body["param"] == param, info.value.body


def test_guided_choice_and_grammar_over_http(client):
    for seed in SEEDS:
        r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=seed, max_tokens=16,
                                           extra_body={"guided_choice": ["sunny", "rainy", "snowy"]})
        assert r.choices[0].message.content in ("sunny", "rainy", "snowy") and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model=MODEL, prompt="Count:", temperature=1.0, seed=4, max_tokens=16,
                                  extra_body={"guided_grammar": 'root ::= [0-9] ("," [0-9]){2}'})
    text = r.choices[0].text
    assert len(text) == 5 and text[1::2] == ",," and text[::2].isdigit()


TOOLS_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% for c in m.tool_calls or [] %}"
    "[call {{ c.function.name }} city={{ c.function.arguments.city }}]{% endfor %}"
    "{% if m.name %}[result of {{ m.name }}]{% endif %}{% endfor %}<assistant>")


def test_a_template_that_reads_tools_renders_them_itself(tiny_llama_dir, tmp_path):
    import asyncio

    from gateway.api.pipeline import Pipeline
    template = tmp_path / "tools.jinja"
    template.write_text(TOOLS_TEMPLATE)
    with LiveServer(model=str(tiny_llama_dir), chat_template=str(template), num_kv_blocks=64, block_size=16,
                    max_model_len=512) as live:
        req = chat(messages=ROUND_TRIP, tools=TOOLS)
        pipe = Pipeline(live.engine, live.config)
        assert pipe.template_uses_tools
        text = live.engine.decode(asyncio.run(pipe.encode_chat(req.messages, req.tools)))
        assert text.startswith("<tools>get_weather;add;</tools><user>What is the weather")   # no preamble
        assert "[call get_weather city=Paris]" in text and "[result of get_weather]" in text
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model=live.engine.model_name, messages=ROUND_TRIP, tools=TOOLS,
                                           tool_choice="required", max_tokens=80, temperature=1.0, seed=1)
        assert r.choices[0].finish_reason in ("tool_calls", "length")   # a random model may run out of tokens
        if r.choices[0].finish_reason == "tool_calls":
            _valid(r.choices[0].message.tool_calls, set(SCHEMAS))


def test_sampling_params_choice_and_grammar_in_the_python_api(tiny_llama_dir):
    from gateway.engine.llm import LLM
    from gateway.sampling.params import SamplingParams
    llm = LLM(str(tiny_llama_dir), num_kv_blocks=64, block_size=16, max_model_len=256)
    try:
        params = [SamplingParams(choice=["red", "green", "blue"], temperature=1.0, seed=s, max_tokens=8)
                  for s in SEEDS]
        assert {o.text for o in llm.generate(["Pick a color:"] * 3, params)} <= {"red", "green", "blue"}
        out = llm.generate(["Digits:"], SamplingParams(grammar='start: /[0-9]{3}/ "!"', temperature=1.0,
                                                       max_tokens=8))[0].text
        assert len(out) == 4 and out[:3].isdigit() and out.endswith("!")
    finally:
        llm.close()


def test_sessions_refuse_tools():
    from starlette.testclient import TestClient

    from gateway.api.app import build_app
    from gateway.config import Config
    from test_api_app import FakeEngine
    with TestClient(build_app(FakeEngine(), Config())) as client:
        sid = client.post("/v1/sessions", json={}).json()["id"]
        r = client.post(f"/v1/sessions/{sid}/chat", json={"content": "hi", "tools": TOOLS})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
