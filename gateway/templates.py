"""Prompt templates for the offline Python API (`LLM.generate(..., template=NAME)`).

Owns the template registry: "chat" (the tokenizer's own chat template, or a Jinja text
given to ChatTemplate), "alpaca" (single-turn instruction format) and "conversation" (a
multi-turn format whose turn separator is its stop symbol), plus `register_template` for
users. A template turns one prompt (a string, or for multi-turn templates a list of
{"role", "content"} messages) into prompt text, says whether the tokenizer should add its
special tokens to that text, and lists stop symbols that the caller adds to the request's
stop strings (so generation ends where the model would start the next turn, and the
symbol is not part of the text). No side effects beyond the registry dict."""

from __future__ import annotations

from dataclasses import dataclass

Prompt = str | list[dict]


def _as_messages(prompt: Prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        return prompt
    raise ValueError("a templated prompt must be a string or a list of {'role', 'content'} messages")


class PromptTemplate:
    stop_symbols: tuple[str, ...] = ()
    add_special_tokens: bool = True   # whether the tokenizer adds BOS etc. to the rendered text

    def render(self, prompt: Prompt, tokenizer) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class ChatTemplate(PromptTemplate):
    """The tokenizer's chat template (or `jinja`), with the assistant's generation prompt."""
    jinja: str | None = None
    add_special_tokens: bool = False   # the template writes its own special tokens

    def render(self, prompt: Prompt, tokenizer) -> str:
        template = self.jinja or getattr(tokenizer, "chat_template", None)
        if not template:
            raise ValueError("this tokenizer has no chat template; pass template='alpaca' or register one")
        return tokenizer.apply_chat_template(_as_messages(prompt), chat_template=template, tokenize=False,
                                             add_generation_prompt=True)


@dataclass(frozen=True)
class FormatTemplate(PromptTemplate):
    """A single-turn template: `text` with a `{prompt}` placeholder."""
    text: str
    stop_symbols: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if "{prompt}" not in self.text:
            raise ValueError("a format template needs a {prompt} placeholder")

    def render(self, prompt: Prompt, tokenizer) -> str:
        if not isinstance(prompt, str):
            raise ValueError("this template is single-turn: pass the prompt as a string")
        return self.text.replace("{prompt}", prompt)


@dataclass(frozen=True)
class ConversationTemplate(PromptTemplate):
    """Multi-turn: system, then "ROLE: content" per message, joined by `separator`, ending
    with the assistant's role. The separator is the stop symbol: a model that has finished
    its answer starts the next turn with it."""
    system: str
    separator: str = "\n### "
    user_role: str = "USER"
    assistant_role: str = "ASSISTANT"

    @property
    def stop_symbols(self) -> tuple[str, ...]:
        return (self.separator,)

    def render(self, prompt: Prompt, tokenizer) -> str:
        messages = _as_messages(prompt)
        system = next((m["content"] for m in messages if m["role"] == "system"), self.system)
        roles = {"user": self.user_role, "assistant": self.assistant_role}
        turns = [f"{roles[m['role']]}: {m['content']}" for m in messages if m["role"] in roles]
        return self.separator.join([system, *turns, f"{self.assistant_role}:"])


ALPACA = FormatTemplate(
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response:\n",
    stop_symbols=("\n### Instruction:",))
CONVERSATION = ConversationTemplate(
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions.")

_TEMPLATES: dict[str, PromptTemplate] = {"chat": ChatTemplate(), "alpaca": ALPACA, "conversation": CONVERSATION}


def register_template(name: str, template: PromptTemplate | str, stop_symbols: list[str] | tuple = ()) -> None:
    """Make `name` usable as generate(..., template=name). A string is a single-turn
    template with a {prompt} placeholder."""
    if isinstance(template, str):
        template = FormatTemplate(template, tuple(stop_symbols))
    elif stop_symbols:
        raise ValueError("stop_symbols go with a string template; a PromptTemplate carries its own")
    if not isinstance(template, PromptTemplate):
        raise TypeError(f"a template is a PromptTemplate or a format string, not {type(template).__name__}")
    _TEMPLATES[name] = template


def get_template(template: str | PromptTemplate) -> PromptTemplate:
    if isinstance(template, PromptTemplate):
        return template
    if template not in _TEMPLATES:
        raise ValueError(f"unknown template {template!r}; known: {', '.join(sorted(_TEMPLATES))} "
                         f"(add one with gateway.templates.register_template)")
    return _TEMPLATES[template]


def template_names() -> list[str]:
    return sorted(_TEMPLATES)
