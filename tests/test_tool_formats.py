"""Tool-call formats beyond Hermes (api/tool_formats.py → tools.py's grammar → tool_calls.py's
parser): the format is detected from the chat template's text; handwritten Llama 3 JSON
(`{"name", "parameters"}`, `<|python_tag|>`, `; `-separated) and Mistral (`[TOOL_CALLS][...]`)
replies parse to the same calls whatever the split, and what is not a call is content; the
grammar for each format constrains the reply to exactly what its parser reads (checked with
llguidance on strings, then over HTTP with a tiny random model and a fixture template of each
kind: forced calls always parse and validate, streamed == non-streamed)."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
from llguidance import LLMatcher, LLTokenizer
from llguidance.hf import from_tokenizer

from gateway.api import protocol as P
from gateway.api import tool_formats as F
from gateway.api.tool_calls import ToolCallParser, parse
from live_server import LiveServer

WEATHER = {"type": "object", "additionalProperties": False, "required": ["unit"],
           "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}}}
DIGIT = {"type": "object", "additionalProperties": False, "required": ["a"],
         "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}}
SCHEMAS = {"get_weather": WEATHER, "digit": DIGIT}
TOOLS = [{"type": "function", "function": {"name": n, "parameters": s}} for n, s in SCHEMAS.items()]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

MISTRAL_TEMPLATE = (
    "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{% for m in messages %}{% if m.role == 'user' %}[INST]{{ m.content }}[/INST]"
    "{% elif m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls | map(attribute='function') | list | tojson }}</s>"
    "{% elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]{% else %}{{ m.content }}</s>"
    "{% endif %}{% endfor %}")
LLAMA3_TEMPLATE = (
    "{% if tools %}<|start_header_id|>user<|end_header_id|>Given the following functions, respond with a JSON "
    "for a function call in the format {\"name\": function name, \"parameters\": dictionary of argument name and "
    "its value}.{{ tools | tojson }}<|eot_id|>{% endif %}{% for m in messages %}<|start_header_id|>{{ m.role }}"
    "<|end_header_id|>{% if m.tool_calls %}<|python_tag|>{{ m.tool_calls[0].function | tojson }}"
    "{% else %}{{ m.content }}{% endif %}<|eot_id|>{% endfor %}<|start_header_id|>assistant<|end_header_id|>")
HERMES_TEMPLATE = ("{% for m in messages %}{{ m.content }}{% endfor %}{% if tools %}<tools>{{ tools | tojson }}"
                   "</tools> Answer with <tool_call>{...}</tool_call>{% endif %}")


@pytest.mark.parametrize("template, fmt", [
    (MISTRAL_TEMPLATE, F.MISTRAL), (LLAMA3_TEMPLATE, F.LLAMA3), (HERMES_TEMPLATE, F.HERMES),
    ("{% for m in messages %}<|ipython|>{% if tools %}{\"parameters\": ...}{% endif %}{% endfor %}", F.LLAMA3),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", F.HERMES),   # no tools variable: our preamble
    ("{% if tools %}{{ tools }}{% endif %}", F.HERMES),                # tools but no known format
    ("[TOOL_CALLS] is mentioned, the tool list never read", F.HERMES),
    (None, F.HERMES),
])
def test_the_format_is_detected_from_the_template(template, fmt):
    assert F.detect(template) == fmt


# ---- the parser, on handwritten replies ------------------------------------------------------

CASES = {
    F.LLAMA3: [
        ('<|python_tag|>{"name": "get_weather", "parameters": {"unit": "celsius", "q": "a}\\"b"}}',
         None, [("get_weather", '{"unit": "celsius", "q": "a}\\"b"}')]),
        ('{"name":"digit","parameters":{"a":3}}; {"name":"get_weather","parameters":{"unit":"fahrenheit"}}',
         None, [("digit", '{"a":3}'), ("get_weather", '{"unit":"fahrenheit"}')]),
        ('  {"name": "digit", "arguments": {"a": 1}}', None, [("digit", '{"a": 1}')]),
        ('{"parameters": {"a": 2}, "name": "digit"}', None, [("digit", '{"a": 2}')]),   # keys in another order
        ('{"name": "digit", "parameters": {"a": 2}, "id": "x"}', None, [("digit", '{"a": 2}')]),
        ("It is sunny in Paris.", "It is sunny in Paris.", []),
        ("{not json at all}", "{not json at all}", []),
        ('{"name": "digit", "parameters": {"a": 1}} and then text', " and then text", [("digit", '{"a": 1}')]),
        ('{"name": "digit", "parameters": {"a":', None, [("digit", '{"a":')]),   # cut off by max_tokens
        ("<|python", "<|python", []),
    ],
    F.MISTRAL: [
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"unit": "celsius"}}, '
         '{"name": "digit", "arguments": {"a": 7}}]',
         None, [("get_weather", '{"unit": "celsius"}'), ("digit", '{"a": 7}')]),
        (' [TOOL_CALLS] [ {"name":"digit","arguments":{"a":[1,{"b":"]"}]}} ] ', None,
         [("digit", '{"a":[1,{"b":"]"}]}')]),
        ('[TOOL_CALLS][{"arguments": {"a": 0}, "name": "digit"}]', None, [("digit", '{"a": 0}')]),
        ("Paris is sunny.", "Paris is sunny.", []),
        ("[1, 2, 3]", "[1, 2, 3]", []),
        ('[TOOL_CALLS][{"name": "digit", "arguments": {"a": 1}}] done', " done", [("digit", '{"a": 1}')]),
        ("[TOOL_CALLS]not a list", "[TOOL_CALLS]not a list", []),
        ('[TOOL_CALLS][{"name": "digit", "argu', '[TOOL_CALLS][{"name": "digit", "argu', []),
    ],
}


def _fed(fmt: str, text: str, step: int):
    parser, calls, arguments, content = ToolCallParser(fmt=fmt), {}, {}, ""
    for i in range(0, len(text), step):
        events = parser.feed(text[i:i + step])
        events += parser.finish() if i + step >= len(text) else []
        for e in events:
            if e.kind == "call":
                calls[e.index] = e.text
            elif e.kind == "arguments":
                arguments[e.index] = arguments.get(e.index, "") + e.text
            else:
                content += e.text
    return parser, calls, arguments, content


@pytest.mark.parametrize("fmt, text, content, calls", [(f, *c) for f, cases in CASES.items() for c in cases])
def test_each_split_parses_to_the_same_calls_and_content(fmt, text, content, calls):
    got_content, got = parse(text, fmt)
    assert (got_content, [(c.name, c.arguments) for c in got]) == (content, calls)
    for step in (1, 2, 3, 7):
        parser, names, arguments, streamed = _fed(fmt, text, step)
        assert [(c.name, c.arguments) for c in parser.calls] == calls
        assert (names, arguments) == ({i: c[0] for i, c in enumerate(calls)}, {i: c[1] for i, c in enumerate(calls)})
        assert (streamed or None) == content


def test_hermes_is_still_the_default_and_reads_no_other_format():
    text = '[TOOL_CALLS][{"name": "digit", "arguments": {"a": 1}}]'
    assert parse(text) == (text, [])
    assert parse('<tool_call>\n{"name": "digit", "arguments": {"a": 1}}\n</tool_call>')[1][0].name == "digit"
    assert parse('<tool_call>{"name":"digit","arguments":{}}</tool_call>', F.MISTRAL)[1] == []


# ---- the grammar writes exactly what the parser reads -----------------------------------------

def _spec(fmt: str, **fields):
    info = P.ModelInfo("m", 49152, 512, tool_format=fmt)
    return P.parse_chat({"messages": ASK, "tools": TOOLS, **fields}, info)


@pytest.fixture(scope="module")
def lltokenizer(default_model_dir):
    from transformers import AutoTokenizer
    return from_tokenizer(AutoTokenizer.from_pretrained(default_model_dir))


def _accepts(grammar: str, tokenizer: LLTokenizer, text: str) -> bool:
    matcher = LLMatcher(tokenizer, LLMatcher.grammar_from_lark(grammar))
    return matcher.consume_tokens(tokenizer.tokenize_str(text)) and matcher.is_accepting()


@pytest.mark.parametrize("fmt, good, bad", [
    (F.LLAMA3, ['{"name":"digit","parameters":{"a":3}}',
                '{"name":"digit","parameters":{"a":3}}; {"name":"get_weather","parameters":{"unit":"celsius"}}'],
     ['{"name":"digit","arguments":{"a":3}}', '<tool_call>\n{"name":"digit","parameters":{"a":3}}\n</tool_call>',
      '{"name":"digit","parameters":{"a":10}}']),
    (F.MISTRAL, ['[TOOL_CALLS][{"name":"digit","arguments":{"a":3}}]',
                 '[TOOL_CALLS][{"name":"digit","arguments":{"a":3}}, {"name":"get_weather","arguments":{"unit":"celsius"}}]'],
     ['{"name":"digit","arguments":{"a":3}}', '[TOOL_CALLS][{"name":"nope","arguments":{"a":3}}]']),
    (F.HERMES, ['<tool_call>\n{"name":"digit","arguments":{"a":3}}\n</tool_call>'],
     ['[TOOL_CALLS][{"name":"digit","arguments":{"a":3}}]']),
])
def test_the_required_grammar_accepts_what_the_parser_reads(lltokenizer, fmt, good, bad):
    grammar = _spec(fmt, tool_choice="required").params.grammar
    for text in good:
        assert _accepts(grammar, lltokenizer, text), text
        content, calls = parse(text, fmt)
        assert content is None and calls
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
    for text in bad:
        assert not _accepts(grammar, lltokenizer, text), text
    auto = _spec(fmt, tool_choice="auto").params.grammar
    assert _accepts(auto, lltokenizer, "Sunny.") and _accepts(auto, lltokenizer, good[0])
    single = _spec(fmt, tool_choice="required", parallel_tool_calls=False).params.grammar
    assert all(_accepts(single, lltokenizer, t) == (len(parse(t, fmt)[1]) == 1) for t in good)


# ---- over HTTP: a tiny random model behind each kind of template --------------------------------

@pytest.mark.parametrize("template, fmt", [(MISTRAL_TEMPLATE, F.MISTRAL), (LLAMA3_TEMPLATE, F.LLAMA3)])
def test_forced_calls_over_http_parse_and_stream_the_same(tiny_llama_dir, tmp_path, template, fmt):
    from gateway.api.pipeline import Pipeline
    path = tmp_path / "template.jinja"
    path.write_text(template)
    with LiveServer(model=str(tiny_llama_dir), chat_template=str(path), num_kv_blocks=64, block_size=16,
                    max_model_len=512) as live:
        pipe = Pipeline(live.engine, live.config)
        assert pipe.info.tool_format == fmt and pipe.template_uses_tools
        history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "digit", "arguments": '{"a": 4}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "4"}]
        req = P.parse_chat({"messages": history, "tools": TOOLS}, pipe.info)
        rendered = live.engine.decode(asyncio.run(pipe.encode_chat(req.messages, req.tools)))
        assert '"name": "digit"' in rendered and ("[TOOL_CALLS]" in rendered or "<|python_tag|>" in rendered)
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        model = live.engine.model_name
        named = {"type": "function", "function": {"name": "get_weather"}}
        for seed, choice in ((1, "required"), (2, "required"), (3, named)):
            fields = dict(model=model, messages=ASK, tools=TOOLS, tool_choice=choice, temperature=1.0,
                          seed=seed, max_tokens=96, parallel_tool_calls=False)
            plain = client.chat.completions.create(**fields).choices[0]
            assert plain.finish_reason == "tool_calls" and plain.message.content is None, plain
            (call,) = plain.message.tool_calls
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
            if choice != "required":
                assert call.function.name == "get_weather"
            with client.chat.completions.stream(**fields) as stream:
                for _ in stream:
                    pass
                streamed = stream.get_final_completion().choices[0]
            assert streamed.finish_reason == "tool_calls"
            assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == \
                [(call.function.name, call.function.arguments)]
