"""No request can hurt another (issue 21, parts 1-2), end to end and in the engine itself:
(a) the hostile sampling values of findings 1 and 8, sent over HTTP to a `gateway serve`
    process beside normal requests, each get a 200 that finished or a 400 naming the field;
    afterwards the same process (its PID still running, /health ok) serves a normal request
    and no KV block is in use;
(b) a fault injected into one request's own path (its detokenizer, or the sampler on its row)
    fails that request alone with finish_reason "error": the other requests of the same batch
    finish normally, every KV block comes back and the engine goes on serving;
(c) a fault outside any request (the executor's forward pass raising) stops the engine, and
    every in-flight request, streamed, plain or still waiting, gets an engine_dead error at
    once: nothing hangs.
All over the session's tiny random-weight llama."""

import asyncio
import time

import httpx
import pytest
import torch

import gateway.sampling.sampler as sampler_module
from gateway.engine.core import POSTPROCESS_FAILED
from gateway.engine.llm import LLM
from gateway.sampling.params import SamplingParams
from gateway.sampling.sampler import SAMPLING_FAILED
from live_server import LiveServer, stream
from server_process import ServerProcess

SERVE_ARGS = ["--num-kv-blocks", "64", "--block-size", "16", "--max-model-len", "256", "--log-level", "warning"]
CHAT = {"messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 8}
COMPLETION = {"prompt": [5, 6, 7, 8], "max_tokens": 8, "ignore_eos": True}
# (endpoint body, the field a 400 must name). Findings 1 and 8, plus the other extremes of each
# sampling field: out of range (400) and at the edge of the range (200).
HOSTILE = [
    ({**CHAT, "repetition_penalty": 1e-46, "temperature": 1.0}, "repetition_penalty"),
    ({**CHAT, "repetition_penalty": 1e39, "temperature": 1.0}, "repetition_penalty"),
    ({**CHAT, "temperature": 1e39, "min_tokens": 2}, "temperature"),
    ({**COMPLETION, "frequency_penalty": 1e39}, "frequency_penalty"),
    ({**COMPLETION, "frequency_penalty": -1e39}, "frequency_penalty"),
    ({**COMPLETION, "presence_penalty": 1e39}, "presence_penalty"),
    ({**COMPLETION, "presence_penalty": -1e39}, "presence_penalty"),
    ({**COMPLETION, "logit_bias": {"5": 1e39}}, "logit_bias"),
    ({**COMPLETION, "logit_bias": {"5": -1e39}}, "logit_bias"),
    ({**COMPLETION, "repetition_penalty": 0.01, "temperature": 1.0}, "repetition_penalty"),
    ({**COMPLETION, "repetition_penalty": 100, "temperature": 1.0}, "repetition_penalty"),
    ({**COMPLETION, "temperature": 100, "min_tokens": 2}, "temperature"),
    ({**COMPLETION, "frequency_penalty": -2, "presence_penalty": -2, "temperature": 1.0}, "frequency_penalty"),
    ({**COMPLETION, "logit_bias": {str(i): 100 for i in range(5, 300)}, "temperature": 1.0}, "logit_bias"),
    ({**COMPLETION, "logit_bias": {"5": -100, "6": -100}, "top_p": 1e-46, "min_p": 1}, "logit_bias"),
]


def _path(body: dict) -> str:
    return "/v1/chat/completions" if "messages" in body else "/v1/completions"


def _judge(response: httpx.Response, field: str) -> None:
    """A 200 whose every choice finished, or a 400 that names the field."""
    if response.status_code == 400:
        error = response.json()["error"]
        assert error["param"] == field and field in error["message"], error
        return
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert choices and all(c["finish_reason"] in ("length", "stop") for c in choices), choices


def test_hostile_sampling_values_get_a_clear_answer_and_the_same_process_serves_on(tiny_llama_dir):
    async def send_all(url: str):
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            # the normal requests run in the same batches as the hostile ones
            normal = [client.post("/v1/completions", json={**COMPLETION, "max_tokens": 24}) for _ in range(3)]
            hostile = [client.post(_path(body), json=body) for body, _ in HOSTILE]
            return await asyncio.gather(*normal, *hostile)

    with ServerProcess([str(tiny_llama_dir), *SERVE_ARGS], start_timeout_s=300) as server:
        pid = server.proc.pid
        answers = asyncio.run(send_all(server.url))
        for response in answers[:3]:
            assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 24
        for response, (_, field) in zip(answers[3:], HOSTILE):
            _judge(response, field)
        assert sum(r.status_code == 400 for r in answers[3:]) >= 9   # the out-of-range ones
        assert sum(r.status_code == 200 for r in answers[3:]) >= 4   # the edge values ran
        after = httpx.post(server.url + "/v1/chat/completions", json=CHAT, timeout=60)
        assert after.status_code == 200 and after.json()["choices"][0]["finish_reason"] in ("length", "stop")
        assert server.proc.poll() is None and server.proc.pid == pid
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        deadline = time.monotonic() + 10
        while (in_use := httpx.get(server.url + "/ready", timeout=10).json()["kv_blocks_in_use"]) and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        assert in_use == 0


# ---- (b) a fault inside one request's own path ------------------------------------------------

@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), num_kv_blocks=64, block_size=16, max_model_len=256, max_num_seqs=8) as engine:
        yield engine


def _run_batch(llm: LLM, params: list[SamplingParams], before_step=None) -> dict[str, list]:
    """Submit one request per params together and step until all finish; their outputs by id."""
    ids = [llm._submit([5 + i, 6, 7, 8], p, chat=False) for i, p in enumerate(params)]
    outputs: dict[str, list] = {rid: [] for rid in ids}
    for _ in range(200):
        if before_step is not None:
            before_step(ids)
        for out in llm.core.step()[0]:
            outputs.setdefault(out.request_id, []).append(out)
        if all(outs and outs[-1].finished for outs in outputs.values()):
            return {rid: outputs[rid] for rid in ids}
    raise AssertionError(f"not finished after 200 steps: {outputs}")


def _assert_alone_failed(llm: LLM, outputs: dict[str, list], bad: str, message: str) -> None:
    for rid, outs in outputs.items():
        last = outs[-1]
        if rid == bad:
            assert last.finish_reason == "error" and last.error == message
        else:
            assert last.finish_reason == "length" and last.error is None
            assert sum(len(o.new_token_ids) for o in outs) == 12 and last.num_output_tokens == 12
    scheduler = llm.core.scheduler
    assert not llm.core.requests and scheduler.num_free_blocks == scheduler.num_total_blocks
    again = llm.generate([[9, 10, 11]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert again[0].finish_reason == "length" and len(again[0].token_ids) == 4


def test_a_detokenizer_fault_fails_only_its_request(llm):
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True) for _ in range(4)]
    poisoned: list[str] = []

    def poison(ids):   # the third request's detokenizer breaks after its first tokens
        tracked = llm.core.requests.get(ids[2])
        if not poisoned and tracked is not None and tracked.seq.num_output_tokens >= 2:
            def boom(tokens):
                raise RuntimeError("injected detokenizer failure")
            tracked.detokenizer.step = boom
            poisoned.append(ids[2])

    outputs = _run_batch(llm, params, poison)
    assert poisoned
    _assert_alone_failed(llm, outputs, poisoned[0], POSTPROCESS_FAILED)


def test_a_sampler_fault_on_one_row_fails_only_its_request(llm, monkeypatch):
    marker = 1.2345   # the poisoned request's repetition_penalty: the sampler raises on its row
    process = sampler_module._process

    def faulty(logits, b, safe=False):
        if b.repetition is not None and torch.isclose(b.repetition, torch.tensor(marker)).any():
            raise FloatingPointError("injected sampler failure")
        return process(logits, b, safe)

    monkeypatch.setattr(sampler_module, "_process", faulty)
    params = [SamplingParams(max_tokens=12, temperature=t, ignore_eos=True, seed=1) for t in (0, 0.8, 0, 0.8)]
    params[1] = SamplingParams(max_tokens=12, temperature=0.8, ignore_eos=True, repetition_penalty=marker)
    outputs = _run_batch(llm, params)
    _assert_alone_failed(llm, outputs, list(outputs)[1], SAMPLING_FAILED)


# ---- (c) a fault outside any request ----------------------------------------------------------

class ForwardFault(RuntimeError):
    pass


def test_a_forward_fault_ends_every_in_flight_request_with_an_error(tiny_llama_dir):
    body = {"prompt": [5, 6, 7], "max_tokens": 200, "ignore_eos": True, "temperature": 0}

    async def main(live: LiveServer):
        execute = live.engine.core.runner.execute

        def slowed(scheduled):   # 200 tokens take >= 4 s, so the streams outlive a late plain post
            time.sleep(0.02)
            return execute(scheduled)
        live.engine.core.runner.execute = slowed

        async def until_two_wait():
            while live.engine.num_waiting() < 2:   # two plain ones wait: max_num_seqs is 3
                await asyncio.sleep(0.01)

        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            running = [asyncio.Event() for _ in range(2)]
            streams = [asyncio.create_task(stream(client, "/v1/completions", body, first_token=e)) for e in running]
            # The streams hold two of the three slots before the plain posts go out: posted together, the
            # plain ones could take all three slots first and the streams would only start after them.
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in running)), 30)
            plain = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(3)]
            await asyncio.wait_for(until_two_wait(), 30)

            def broken(scheduled):
                raise ForwardFault("injected forward failure")
            live.engine.core.runner.execute = broken
            try:
                start = time.monotonic()
                results = await asyncio.wait_for(asyncio.gather(*streams, *plain), 20)
                return results, time.monotonic() - start
            finally:
                live.engine.core.runner.execute = execute

    with LiveServer(model=str(tiny_llama_dir), num_kv_blocks=64, block_size=16, max_model_len=256,
                    max_num_seqs=3) as live:
        results, elapsed = asyncio.run(main(live))
        assert not live.engine.is_alive
    assert elapsed < 10
    for status, frames in results[:2]:
        assert status == 200 and frames[-1] == "[DONE]" and frames[-2]["error"]["code"] == "engine_dead"
    for response in results[2:]:
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_dead"
