"""The offline Python API: `LLM(model, **config).generate(prompts, params)` and
`.stream(prompt, params)`, driving an EngineCore in the caller's thread (no server,
no event loop). Also `gateway generate`, which streams one answer to stdout.

Keyword style, for scripts: `LLM.from_pretrained(path).generate(prompts, max_gen_len=64,
temperature=0.6, top_p=0.9, additional_stop_symbols=["\n\n"], template="alpaca")` and
`.stream_generate(prompt, ...)`, which yields the text so far. A template (gateway/templates.py)
renders each prompt and adds its stop symbols to the stop strings; stop symbols end
generation and never appear in the text."""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

from gateway.config import Config
from gateway.engine.core import EngineCore
from gateway.engine.messages import EngineRequest, RequestOutput
from gateway.sampling.logprobs import TokenLogprob
from gateway.sampling.params import SamplingParams
from gateway.templates import ChatTemplate, PromptTemplate, get_template

Prompt = str | list[int] | list[dict]   # text, token ids, or chat messages (with a template)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    stop_reason: str | int | None = None


class LLM:
    def __init__(self, model: str | None = None, **config_fields):
        if "quant" in config_fields:   # LLaMA2-Accessory's spelling of `quantization`
            config_fields["quantization"] = config_fields.pop("quant")
        self.config = Config(model=model, **config_fields)
        self.core = EngineCore(self.config)
        self.tokenizer = self.core.tokenizer
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(cls, path: str | None = None, **overrides) -> "LLM":
        return cls(path, **overrides)

    def close(self) -> None:
        """Stop tensor-parallel worker processes (tensor_parallel_size > 1); idempotent."""
        self.core.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def template(self, template: str | PromptTemplate | None, chat: bool = False) -> PromptTemplate | None:
        """The template a call asked for (chat=True means "chat"); None for raw prompts."""
        if template is None and not chat:
            return None
        resolved = get_template(template or "chat")
        if isinstance(resolved, ChatTemplate) and resolved.jinja is None and self.config.chat_template:
            with open(self.config.chat_template) as f:
                resolved = ChatTemplate(f.read())
        return resolved

    def encode(self, prompt: Prompt, chat: bool = False, template: str | PromptTemplate | None = None) -> list[int]:
        if isinstance(prompt, list) and (not prompt or isinstance(prompt[0], int)):
            return list(prompt)
        resolved = self.template(template, chat)
        if resolved is None:
            if not isinstance(prompt, str):
                raise ValueError("a list of messages needs a template: pass chat=True or template=NAME")
            return self.tokenizer.encode(prompt)
        text = resolved.render(prompt, self.tokenizer)
        return self.tokenizer.encode(text, add_special_tokens=resolved.add_special_tokens)

    def _submit(self, prompt: Prompt, params: SamplingParams, chat: bool, template=None) -> str:
        request_id = f"llm-{next(self._ids)}"
        self.core.add_request(EngineRequest(request_id, self.encode(prompt, chat, template), params))
        return request_id

    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 chat: bool = False, *, max_gen_len: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, additional_stop_symbols: list[str] | None = None,
                 template: str | PromptTemplate | None = None) -> list[GenerationResult]:
        """Run every prompt together in continuous batches; results in prompt order.
        Keywords override `params` (or SamplingParams() defaults) for every prompt."""
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], (int, dict)))
        prompt_list = [prompts] if single else list(prompts)
        param_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompt_list)
        stops = list(additional_stop_symbols or ()) + list(getattr(self.template(template, chat), "stop_symbols", ()))
        param_list = [_with_keywords(sp, max_gen_len, temperature, top_p, stops) for sp in param_list]
        ids = [self._submit(p, sp, chat, template) for p, sp in zip(prompt_list, param_list)]
        results = {rid: GenerationResult("", [], None, 0, 0) for rid in ids}
        pending = set(ids)
        while pending:
            outputs, _ = self.core.step()
            for out in outputs:
                if out.request_id in results:
                    _accumulate(results[out.request_id], out)
                    if out.finished:
                        pending.discard(out.request_id)
        return [results[rid] for rid in ids]

    def embed(self, inputs: Prompt | list[Prompt], pooling: str | None = None) -> list[list[float]]:
        """L2-normalized embeddings of each input (text or token ids), in input order, batched
        as prefill-only sequences; pooling: "last" or "mean" (default: Config.embedding_pooling)."""
        single = isinstance(inputs, str) or (inputs and isinstance(inputs[0], int))
        params = SamplingParams(max_tokens=1, temperature=0)
        ids = []
        for prompt in [inputs] if single else list(inputs):
            ids.append(f"llm-{next(self._ids)}")
            self.core.add_request(EngineRequest(ids[-1], self.encode(prompt), params,
                                                pooling=pooling or self.config.embedding_pooling))
        vectors: dict[str, list[float]] = {}
        while len(vectors) < len(ids):
            for out in self.core.step()[0]:
                if out.finished and out.request_id in ids:
                    if out.embedding is None:
                        raise RuntimeError(f"embedding {out.request_id} ended with {out.finish_reason}: {out.error}")
                    vectors[out.request_id] = out.embedding
        return [vectors[rid] for rid in ids]

    def stream_generate(self, prompt: Prompt, params: SamplingParams | None = None, chat: bool = False, *,
                        max_gen_len: int | None = None, temperature: float | None = None, top_p: float | None = None,
                        additional_stop_symbols: list[str] | None = None,
                        template: str | PromptTemplate | None = None) -> Iterator[str]:
        """Yield the text generated so far (the whole string, longer each time)."""
        stops = list(additional_stop_symbols or ()) + list(getattr(self.template(template, chat), "stop_symbols", ()))
        params = _with_keywords(params or SamplingParams(), max_gen_len, temperature, top_p, stops)
        text = ""
        for out in self.stream(prompt, params, chat, template=template):
            if out.new_text:
                text += out.new_text
                yield text

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, chat: bool = False,
               template: str | PromptTemplate | None = None) -> Iterator[RequestOutput]:
        """Yield this prompt's deltas as they are produced; closing the iterator aborts it."""
        request_id = self._submit(prompt, params or SamplingParams(), chat, template)
        finished = False
        try:
            while not finished:
                outputs, _ = self.core.step()
                for out in outputs:
                    if out.request_id == request_id:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.core.abort(request_id)


def _with_keywords(params: SamplingParams, max_gen_len: int | None, temperature: float | None,
                   top_p: float | None, stop_symbols: list[str]) -> SamplingParams:
    """params with the keyword-style overrides applied (validated again by SamplingParams)."""
    changes = {name: value for name, value in (("max_tokens", max_gen_len), ("temperature", temperature),
                                               ("top_p", top_p)) if value is not None}
    if stop_symbols:
        changes["stop"] = list(dict.fromkeys([*params.stop, *stop_symbols]))
    return dataclasses.replace(params, **changes) if changes else params


def _accumulate(result: GenerationResult, out: RequestOutput) -> None:
    result.text += out.new_text
    result.token_ids += out.new_token_ids
    result.prompt_tokens = out.num_prompt_tokens
    result.completion_tokens = out.num_output_tokens
    if out.logprobs:
        result.logprobs += out.logprobs
    if out.finished:
        result.finish_reason, result.stop_reason = out.finish_reason, out.stop_reason


def generate_command(config: Config, prompt: str, max_tokens: int, temperature: float, chat: bool) -> int:
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    with LLM(**vars(config)) as llm:    # closing stops tensor-parallel workers
        for delta in llm.stream(prompt, params, chat=chat):
            sys.stdout.write(delta.new_text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
