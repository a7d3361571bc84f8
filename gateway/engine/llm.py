"""The offline Python API: `LLM(model, **config).generate(prompts, params)` and
`.stream(prompt, params)`, driving an EngineCore in the caller's thread (no server,
no event loop). Also `gateway generate`, which streams one answer to stdout."""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

from gateway.config import Config
from gateway.engine.core import EngineCore
from gateway.engine.messages import EngineRequest, RequestOutput, TokenLogprob
from gateway.sampling.params import SamplingParams

Prompt = str | list[int]


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
        self.config = Config(model=model, **config_fields)
        self.core = EngineCore(self.config)
        self.tokenizer = self.core.tokenizer
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(cls, path: str | None = None, **overrides) -> "LLM":
        return cls(path, **overrides)

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt)

    def _submit(self, prompt: Prompt, params: SamplingParams, chat: bool) -> str:
        request_id = f"llm-{next(self._ids)}"
        self.core.add_request(EngineRequest(request_id, self.encode(prompt, chat), params))
        return request_id

    def generate(self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None,
                 chat: bool = False) -> list[GenerationResult]:
        """Run every prompt together in continuous batches; results in prompt order."""
        single = isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
        prompt_list = [prompts] if single else list(prompts)
        param_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompt_list)
        ids = [self._submit(p, sp, chat) for p, sp in zip(prompt_list, param_list)]
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

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, chat: bool = False) -> Iterator[RequestOutput]:
        """Yield this prompt's deltas as they are produced; closing the iterator aborts it."""
        request_id = self._submit(prompt, params or SamplingParams(), chat)
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
    llm = LLM(**{**config.__dict__})
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature)
    for delta in llm.stream(prompt, params, chat=chat):
        sys.stdout.write(delta.new_text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
