"""EngineCore: the step loop's state, run by one thread and touched by no other.

Construction order: user model module → model source → config + tokenizer → model runner
(weights, KV cache) → scheduler sized to the KV cache. Each `step()`: schedule → execute
→ scheduler.update → per sequence that got a token: detokenize, check stop conditions,
finish (freeing blocks at once) → RequestOutput deltas + StepStats.
Fault isolation: what one request causes fails that request alone (finish_reason "error",
its blocks freed) and the loop goes on: a row the sampler reports as failed or an id outside
the vocabulary (checked before scheduler.update, so it never reaches the next forward), and
an exception in its own post-processing. Only a fault outside any one request (the forward
pass, the scheduler) stops the loop.
The runner comes from executor.create_executor: the ModelRunner itself at tp=1, a
TensorParallelExecutor (rank 0 here, workers spawned) above; shutdown() stops its workers.
Prefix pins (chat sessions holding their KV between turns): pin_prefix / unpin_prefix run
between steps; a step that preempts, or schedules nothing while requests wait, releases the
least recently pinned prefix, so pins never starve live requests."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from gateway.config import Config
from gateway.engine.detokenizer import IncrementalDetokenizer
from gateway.engine.errors import RequestRejectedError, check_context_length
from gateway.engine.messages import EngineRequest, RequestOutput, StepStats
from gateway.executor.executor import create_executor
from gateway.executor.interface import Executor, PooledChunk, StepResult
from gateway.executor.placement import threads_per_rank
from gateway.models import registry
from gateway.models.loader import generation_defaults, load_hf_config, load_tokenizer, resolve_source
from gateway.sampling.grammar import GrammarError, GrammarFactory
from gateway.scheduler.prefix_pins import PrefixPins
from gateway.scheduler.scheduler import Scheduler
from gateway.scheduler.sequence import Sequence

log = logging.getLogger("gateway.engine")

# What a client reads when its request alone failed (details go to the server log).
POSTPROCESS_FAILED = "this request failed while its output was being processed; the server log has the details"
INVALID_TOKEN = "the sampler produced no valid token for this request"
GRAMMAR_REJECTED = "the sampled token broke this request's grammar; the server log has the details"


@dataclass
class _Tracked:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    sent_first: bool = False
    pool_sum: torch.Tensor | None = None   # embeddings: the float32 sum of the hidden states so far
    pool_count: int = 0


def _eos_ids(hf_config, tokenizer, gen_defaults: dict) -> set[int]:
    ids: set[int] = set()
    for value in (gen_defaults.get("eos_token_id"), getattr(hf_config, "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


class EngineCore:
    def __init__(self, config: Config):
        self.config = config
        torch.set_num_threads(threads_per_rank(config))
        if config.model_module:
            registry.load_model_module(config.model_module)
        self.source = resolve_source(config.model, Path(config.cache_dir).expanduser())
        hf_config = load_hf_config(self.source)
        self.tokenizer = load_tokenizer(self.source)
        self.eos_token_ids = _eos_ids(hf_config, self.tokenizer, generation_defaults(self.source))
        self.runner: Executor = create_executor(config, self.source, hf_config, self.eos_token_ids)
        self.grammars = GrammarFactory(self.tokenizer, self.runner.arch.vocab_size, self.eos_token_ids)
        try:
            self._build_scheduler(config)
        except BaseException:
            self.shutdown()   # tensor-parallel workers must not outlive a failed start
            raise

    def _build_scheduler(self, config: Config) -> None:
        self.max_model_len = self._decide_max_model_len()
        self.scheduler = Scheduler(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=max(config.max_num_batched_tokens, 1),
            max_model_len=self.max_model_len, num_blocks=self.runner.num_blocks,
            block_size=config.block_size, enable_prefix_caching=config.enable_prefix_caching,
            max_prefill_tokens_with_decodes=config.max_prefill_tokens_with_decodes)
        self.requests: dict[str, _Tracked] = {}
        budget = config.session_kv_budget_blocks
        self.pins = PrefixPins(self.scheduler.block_pool, self.runner.num_blocks // 2 if budget is None else budget)

    # ---- executor lifecycle (tensor-parallel workers; no-ops at tp=1) ----------------------
    @property
    def worker_pids(self) -> list[int]:
        return list(self.runner.worker_pids)

    def check_health(self) -> None:
        """Raises ExecutorDeadError once a tensor-parallel worker has died."""
        self.runner.check_health()

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers; idempotent."""
        self.runner.shutdown()

    def _decide_max_model_len(self) -> int:
        arch = self.runner.arch
        limit = arch.max_position_embeddings
        if arch.sliding_window:
            limit = min(limit, arch.sliding_window)
        capacity = self.runner.num_blocks * self.config.block_size
        if self.config.max_model_len is None:
            if capacity < limit:
                log.warning("max_model_len lowered from %d to the KV cache's %d tokens", limit, capacity)
            return min(limit, capacity)
        if self.config.max_model_len > limit:
            raise ValueError(f"--max-model-len {self.config.max_model_len} exceeds the model's "
                             f"context length {limit}")
        return self.config.max_model_len

    # ---- requests ------------------------------------------------------------------------
    def check_request(self, request: EngineRequest) -> None:
        """The one admission check of a request's shape (empty prompt, prompt + max_tokens
        against the context, ids inside the vocabulary): raises RequestRejectedError. Reads
        only what is fixed after construction, so AsyncEngine.submit runs it on the event loop
        and a refusal is answered synchronously."""
        prompt_len = len(request.prompt_token_ids)
        if prompt_len == 0:
            raise RequestRejectedError("the prompt is empty (0 tokens)", "prompt")
        if request.pooling is None:
            check_context_length(self.max_model_len, prompt_len, request.params.max_tokens)
        elif prompt_len > self.max_model_len:   # an embedding generates nothing: the input alone must fit
            raise RequestRejectedError(f"This model's maximum context length is {self.max_model_len} tokens; "
                                       f"the input has {prompt_len}.", "prompt", code="context_length_exceeded")
        if request.pooling not in (None, "last", "mean"):
            raise RequestRejectedError(f"pooling must be last or mean, not {request.pooling!r}", "pooling")
        vocab = self.runner.arch.vocab_size
        if any(t < 0 or t >= vocab for t in request.prompt_token_ids):
            raise RequestRejectedError(f"prompt token ids must be in [0, {vocab})", "prompt")
        if any(t < 0 or t >= vocab for t in request.params.logit_bias):
            raise RequestRejectedError(f"logit_bias token ids must be in [0, {vocab})", "logit_bias")
        if (key := request.params.grammar_key) is not None:
            try:   # a template per grammar (cached), built here rather than in admit's step
                self.grammars.new_state(key)
            except GrammarError as exc:
                raise RequestRejectedError(f"invalid {key[0]}: {exc}", key[0]) from None

    def add_request(self, request: EngineRequest) -> None:
        """check_request, then admit (offline callers: LLM, the warm-up)."""
        self.check_request(request)
        self.admit(request)

    def admit(self, request: EngineRequest) -> None:
        """Queue an already checked request for scheduling."""
        seq = Sequence(request.request_id, list(request.prompt_token_ids), request.params,
                       arrival_time=request.arrival_time, pooling=request.pooling)
        if (key := request.params.grammar_key) is not None:
            seq.grammar = self.grammars.new_state(key)   # a deep copy of check_request's template
        self.scheduler.add(seq)
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, request.params)
        self.requests[request.request_id] = _Tracked(seq, detok)

    def abort(self, request_id: str) -> RequestOutput | None:
        tracked = self.requests.pop(request_id, None)
        if tracked is None:
            return None     # already finished: late aborts are dropped
        self.scheduler.abort(request_id)
        return self._output(tracked, [], "", None, finished=True, reason="abort")

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_unfinished

    # ---- prefix pins ---------------------------------------------------------------------
    def pin_prefix(self, key, token_ids: list[int]) -> int:
        """Hold the cached full blocks of token_ids (replacing key's previous pin), within
        the pin budget; returns the number of blocks pinned."""
        return self.pins.pin(key, token_ids)

    def unpin_prefix(self, key) -> int:
        return self.pins.unpin(key)

    # ---- the step ------------------------------------------------------------------------
    def step(self) -> tuple[list[RequestOutput], StepStats]:
        plan = self.scheduler.schedule()
        starved = plan.num_preemptions or (not plan.scheduled and self.scheduler.num_waiting)
        if starved and (key := self.pins.release_oldest()) is not None:
            log.info("KV cache short: released the pinned prefix of %r", key)
        outputs: list[RequestOutput] = []
        if plan.scheduled:
            result = self.runner.execute(plan.scheduled)
            failed = self._fail_bad_samples(plan.scheduled, result)
            self.scheduler.update(plan, result.token_ids)
            for i, entry in enumerate(plan.scheduled):
                token = result.token_ids[i]
                if i in failed:
                    outputs.append(failed[i])
                elif token is not None:
                    logprob = result.logprobs[i] if result.logprobs is not None else None
                    outputs.append(self._advance_or_fail(entry.seq, token, logprob))
                elif entry.seq.pooling is not None and (out := self._pool(entry, result.pooled.get(i))):
                    outputs.append(out)
        return outputs, self._stats(plan)

    def _pool(self, entry, chunk: PooledChunk | None) -> RequestOutput | None:
        """Add a step's hidden states to an embedding; its output once the prompt is done
        (Scheduler.update has finished it and freed its blocks). Embeddings never hit the
        prefix cache, so a chunk starting at 0 is a fresh start, after preemption too."""
        tracked = self.requests.get(entry.seq.request_id)
        if tracked is None:
            return None
        if chunk is not None:
            if chunk.start == 0 or tracked.pool_sum is None:
                tracked.pool_sum, tracked.pool_count = chunk.vector.clone(), chunk.count
            else:
                tracked.pool_sum += chunk.vector
                tracked.pool_count += chunk.count
        if not entry.samples:
            return None
        del self.requests[entry.seq.request_id]
        vector = torch.nn.functional.normalize(tracked.pool_sum / tracked.pool_count, dim=0)
        out = self._output(tracked, [], "", None, finished=True, reason="stop")
        out.embedding = vector.tolist()
        return out

    def _fail_bad_samples(self, scheduled, result: StepResult) -> dict[int, RequestOutput]:
        """The boundary before scheduler.update: a row the sampler reported as failed, or whose
        token id the model could not embed, fails its own request (finished before the update,
        so the id never reaches the next forward pass) and the other rows go on."""
        vocab, failed = self.runner.arch.vocab_size, {}
        for i, token in enumerate(result.token_ids):
            if token is None:
                continue
            why = result.errors.get(i)
            if why is None and not (isinstance(token, int) and 0 <= token < vocab):
                log.error("request %s: the sampler returned token id %r, outside [0, %d); that request "
                          "alone is failed", scheduled[i].seq.request_id, token, vocab)
                why = INVALID_TOKEN
            if why is not None:
                failed[i] = self._fail(scheduled[i].seq, why)
        return failed

    def _fail(self, seq: Sequence, message: str) -> RequestOutput:
        """End one request with finish_reason "error" and a client-facing message; its blocks
        are freed now."""
        self.requests.pop(seq.request_id, None)
        self.scheduler.finish(seq, "error")   # idempotent
        return RequestOutput(seq.request_id, [], "", finished=True, finish_reason="error", error=message,
                             num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens)

    def _advance_or_fail(self, seq: Sequence, token: int, logprob) -> RequestOutput:
        """A failure in one request's own post-processing (detokenizer, stop checks) fails that
        request alone: its blocks are freed and it ends with finish_reason "error" (the exception
        goes to the log, not to the client). Failures in the batched forward pass cannot be
        attributed to a request and still stop the loop."""
        try:
            return self._advance(seq, token, logprob)
        except Exception:
            log.exception("request %s failed after a step; the other requests continue", seq.request_id)
            return self._fail(seq, POSTPROCESS_FAILED)

    def _advance(self, seq: Sequence, token: int, logprob) -> RequestOutput:
        tracked = self.requests[seq.request_id]
        params = seq.params
        reason, stop_reason, text = None, None, ""
        if seq.grammar is not None and not seq.grammar.advance(token):
            log.error("request %s: the grammar rejected token %d: %s", seq.request_id, token, seq.grammar.error)
            return self._fail(seq, GRAMMAR_REJECTED)
        if token in self.eos_token_ids and not params.ignore_eos:
            reason = "stop"
        elif token in params.stop_token_ids:
            reason, stop_reason = "stop", token
        else:
            text, stop_string = tracked.detokenizer.step([token])
            if stop_string is not None:
                reason, stop_reason = "stop", stop_string
        if reason is None and seq.grammar is not None and seq.grammar.is_stopped:
            reason = "stop"   # the grammar allows nothing but EOS now: end without that step
        if reason is None and (seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if not isinstance(stop_reason, str):   # a stop string cuts the held-back tail instead
                text += tracked.detokenizer.flush()
            self.scheduler.finish(seq, reason)
            del self.requests[seq.request_id]
        return self._output(tracked, [token], text, [logprob] if logprob is not None else None,
                            finished=reason is not None, reason=reason, stop_reason=stop_reason)

    def _output(self, tracked: _Tracked, tokens, text, logprobs, finished, reason, stop_reason=None) -> RequestOutput:
        seq = tracked.seq
        out = RequestOutput(
            request_id=seq.request_id, new_token_ids=tokens, new_text=text, logprobs=logprobs,
            finished=finished, finish_reason=reason, num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens, num_output_tokens=seq.num_output_tokens,
            stop_reason=stop_reason)
        if not tracked.sent_first:
            out.first_scheduled_time = seq.first_scheduled_time
            tracked.sent_first = True
        return out

    def _stats(self, plan) -> StepStats:
        s = self.scheduler
        return StepStats(
            num_running=s.num_running, num_waiting=s.num_waiting, kv_cache_usage=s.kv_cache_usage,
            num_preemptions=plan.num_preemptions, num_recomputed_tokens=plan.num_recomputed_tokens,
            prefix_cache_queries=plan.prefix_cache_queries,
            prefix_cache_hits=plan.prefix_cache_hits, num_batched_tokens=plan.num_batched_tokens,
            num_free_blocks=s.num_free_blocks, num_total_blocks=s.num_total_blocks)

