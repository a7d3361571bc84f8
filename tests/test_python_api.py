"""The keyword-style Python API (LLM.generate / stream_generate with max_gen_len, temperature,
top_p, additional_stop_symbols, template) and the prompt templates, on one tiny random model.
Greedy in float32 throughout, so a prompt always produces the same text and a stop symbol
taken from that text must cut it exactly there."""

import pytest

from conftest import make_tiny_model
from gateway.sampling.params import SamplingParams
from gateway.templates import (ALPACA, CONVERSATION, ChatTemplate, ConversationTemplate, get_template,
                               register_template)

PROMPT = "Tell me about the river"
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def llm(tmp_path_factory, default_model_dir):
    from gateway import LLM
    model = make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", default_model_dir)
    return LLM.from_pretrained(str(model), dtype="float32", num_kv_blocks=128)


@pytest.fixture
def submitted(llm, monkeypatch):
    """The EngineRequests the LLM hands to its engine core."""
    requests = []
    real_add = llm.core.add_request
    monkeypatch.setattr(llm.core, "add_request", lambda request: requests.append(request) or real_add(request))
    return requests


def test_a_stop_symbol_ends_generation_and_is_not_in_the_text(llm):
    free = llm.generate(PROMPT, max_gen_len=24, temperature=0)[0]
    symbol = free.text[len(free.text) // 2:len(free.text) // 2 + 3]
    assert len(symbol) == 3 and free.completion_tokens == 24
    stopped = llm.generate(PROMPT, max_gen_len=24, temperature=0, additional_stop_symbols=[symbol])[0]
    assert stopped.text == free.text[:free.text.index(symbol)]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == symbol
    assert symbol not in stopped.text


def test_keywords_override_params_and_the_params_form_still_works(llm):
    by_params = llm.generate([PROMPT, "Another prompt"], SamplingParams(max_tokens=5, temperature=0))
    assert [r.completion_tokens for r in by_params] == [5, 5]
    by_keywords = llm.generate(PROMPT, SamplingParams(max_tokens=5, temperature=0), max_gen_len=3)[0]
    assert by_keywords.completion_tokens == 3 and by_params[0].text.startswith(by_keywords.text)


def test_stream_generate_yields_the_growing_text(llm):
    texts = list(llm.stream_generate(PROMPT, max_gen_len=12, temperature=0))
    assert len(texts) >= 2
    assert all(len(a) < len(b) and b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert texts[-1] == llm.generate(PROMPT, max_gen_len=12, temperature=0)[0].text


def test_alpaca_and_conversation_render_their_exact_prompts():
    assert ALPACA.render("Say hi", None) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nSay hi\n\n### Response:\n")
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "Bye"}]
    assert CONVERSATION.render(conversation, None) == (
        f"{CONVERSATION.system}\n### USER: Hi\n### ASSISTANT: Hello!\n### USER: Bye\n### ASSISTANT:")
    custom = ConversationTemplate("Sys.", separator="</s>")
    assert custom.render([{"role": "system", "content": "Own."}, *conversation[:1]], None) == \
        "Own.</s>USER: Hi</s>ASSISTANT:" and custom.stop_symbols == ("</s>",)


def test_the_chat_template_is_the_tokenizers(llm):
    assert ChatTemplate().render("Hi", llm.tokenizer) == (
        f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert llm.encode("Hi", template="chat") == llm.encode("Hi", chat=True) == llm.tokenizer.encode(
        ChatTemplate().render("Hi", llm.tokenizer), add_special_tokens=False)


def test_a_template_renders_the_prompt_and_adds_its_stop_symbol(llm, submitted):
    llm.generate("Hi", max_gen_len=2, temperature=0, template="conversation", additional_stop_symbols=["END"])
    request = submitted[-1]
    assert request.prompt_token_ids == llm.tokenizer.encode(CONVERSATION.render("Hi", None))
    assert request.params.stop == ["END", "\n### "]


def test_registered_templates_are_usable_by_name(llm, submitted):
    register_template("qa", "Q: {prompt}\nA:", stop_symbols=["\nQ:"])
    llm.generate("Why?", max_gen_len=2, template="qa")
    assert submitted[-1].prompt_token_ids == llm.tokenizer.encode("Q: Why?\nA:")
    assert submitted[-1].params.stop == ["\nQ:"]
    with pytest.raises(ValueError, match="placeholder"):
        register_template("broken", "no placeholder here")
    with pytest.raises(ValueError, match="unknown template"):
        get_template("nonexistent")
