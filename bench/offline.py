"""Offline throughput: N prompts x input/output tokens through gateway's engine, and the same
workload through transformers' generate (batched, left-padded) for comparison.

    python bench/offline.py --num-prompts 64 --input-len 256 --output-len 128 --hf
    python bench/offline.py --profile     # one decode step at batch 64 under torch.profiler
    python bench/offline.py --profile --profile-batch 1 --num-prompts 1 --quantization none   # A/B
    python bench/offline.py --single-stream --num-prompts 8 --input-len 128 --output-len 128

--single-stream streams the prompts one after another (concurrency 1) and prints TTFT and
inter-token latency, the offline side of bench/latency.py (the same prompts through HTTP).
"""

from __future__ import annotations

import argparse
import time

import torch


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n, length), generator=g).tolist()


def bench_gateway(args, prompts) -> float:
    from gateway.engine.llm import LLM
    from gateway.sampling.params import SamplingParams
    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              max_prefill_tokens_with_decodes=args.max_prefill_tokens_with_decodes, num_threads=args.threads,
              quantization=args.quantization)
    params = SamplingParams(max_tokens=args.output_len, min_tokens=args.output_len, ignore_eos=True, temperature=0)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0))     # warm-up, as bench/serve.py's
    if args.single_stream:
        return bench_single_stream(llm, prompts, params)
    start = time.perf_counter()
    results = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    out_tokens = sum(r.completion_tokens for r in results)
    print(f"gateway      : {len(prompts)} prompts, {out_tokens} output tokens in {elapsed:.1f} s "
          f"= {out_tokens / elapsed:.1f} output tok/s ({(out_tokens + sum(map(len, prompts))) / elapsed:.1f} total tok/s)")
    if args.profile:
        profile_decode(llm, prompts, args.profile_batch)
    return out_tokens / elapsed


def format_latencies(seconds: list[float]) -> str:
    values = sorted(seconds)
    return (f"mean {1e3 * sum(values) / len(values):.2f} median {1e3 * values[len(values) // 2]:.2f} "
            f"P99 {1e3 * values[int(0.99 * (len(values) - 1))]:.2f} ms")


def bench_single_stream(llm, prompts, params) -> float:
    """TTFT and inter-token gaps of each prompt streamed alone, as bench/serve.py reports them."""
    ttfts, itls, out_tokens, start = [], [], 0, time.perf_counter()
    for prompt in prompts:
        sent = last = time.perf_counter()
        for i, _ in enumerate(llm.stream(prompt, params)):
            now = time.perf_counter()
            (itls if i else ttfts).append(now - (last if i else sent))
            last, out_tokens = now, out_tokens + 1
    elapsed = time.perf_counter() - start
    print(f"gateway single stream: {len(prompts)} prompts, {out_tokens / elapsed:.1f} output tok/s\n"
          f"  TTFT {format_latencies(ttfts)}\n  ITL  {format_latencies(itls)}")
    return out_tokens / elapsed


def profile_decode(llm, prompts, batch: int) -> None:
    """Fill the batch with `batch` decoding sequences, then profile a single step."""
    from torch.profiler import ProfilerActivity, profile
    from gateway.engine.messages import EngineRequest
    from gateway.sampling.params import SamplingParams
    params = SamplingParams(max_tokens=64, min_tokens=64, ignore_eos=True, temperature=0)
    for i, p in enumerate(prompts[:batch]):
        llm.core.add_request(EngineRequest(f"prof-{i}", p, params))
    for _ in range(8):
        llm.core.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        llm.core.step()
        print(f"one decode step at batch {llm.core.scheduler.num_running}: {(time.perf_counter() - start) * 1e3:.1f} ms")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def bench_transformers(args, prompts, batch_size: int) -> float:
    from transformers import AutoModelForCausalLM
    from gateway.models.loader import resolve_source
    from pathlib import Path
    source = resolve_source(args.model, Path("~/.cache/gateway").expanduser())
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.hf_dtype]
    model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype).eval()
    out_tokens, start = 0, time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            batch = torch.tensor(prompts[i:i + batch_size])     # equal lengths: no padding needed
            out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=args.output_len,
                                 min_new_tokens=args.output_len, do_sample=False, pad_token_id=0)
            out_tokens += (out.shape[1] - batch.shape[1]) * batch.shape[0]
    elapsed = time.perf_counter() - start
    print(f"transformers : batch {batch_size} {args.hf_dtype}, {out_tokens} output tokens in {elapsed:.1f} s "
          f"= {out_tokens / elapsed:.1f} output tok/s")
    return out_tokens / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-prefill-tokens-with-decodes", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--hf", action="store_true", help="also run transformers' generate")
    p.add_argument("--hf-batch", type=int, default=32)
    p.add_argument("--hf-dtype", default="float32", choices=["bfloat16", "float32"],
                   help="transformers' dtype (fp32 is its faster CPU path: F.linear in bf16 is not prepacked)")
    p.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4"],
                   help="as `gateway serve --quantization` (none: the GGUF dequantized to bf16)")
    p.add_argument("--profile", action="store_true", help="profile one decode step (at --profile-batch)")
    p.add_argument("--profile-batch", type=int, default=64)
    p.add_argument("--single-stream", action="store_true", help="one prompt at a time: TTFT and ITL")
    args = p.parse_args()
    prompts = random_prompts(args.num_prompts, args.input_len, 49152)
    ours = bench_gateway(args, prompts)
    if args.hf:
        theirs = bench_transformers(args, prompts, args.hf_batch)
        print(f"ratio        : {ours / theirs:.2f}x transformers")


if __name__ == "__main__":
    main()
