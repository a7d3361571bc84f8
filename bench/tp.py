"""Tensor- and pipeline-parallel benchmarks: collective latency (gloo vs shared memory) and
offline output tokens/s at --tp 1 and --tp 2 (or --pp 1 and --pp 2), at concurrency 1 and 32,
each configuration in a fresh process.

    python bench/tp.py --collectives             # all-reduce / gather latency, shm vs gloo
    python bench/tp.py                           # throughput table (default model, bf16 auto)
    python bench/tp.py --tp 1 2 --concurrency 1 32 --output-len 64 --repeat 2
    python bench/tp.py --tp 1 --pp 1 2           # pipeline stages: bytes between stages per
                                                 # step, the driver stage's idle (waiting) share

For the tensor-parallel runs, rank 0's collectives are timed (wait for the peer included),
so the table shows how much of a step is communication and imbalance rather than compute.
Machines shared with other work give noisy numbers: run --repeat and read the spread."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

SHAPES = [("all_reduce", (1, 576), "bfloat16"), ("all_reduce", (32, 576), "bfloat16"),
          ("all_reduce", (64, 576), "bfloat16"), ("all_reduce", (512, 576), "bfloat16"),
          ("gather", (32, 24576), "float32")]


# ---- collectives ------------------------------------------------------------------------------
def _time_collectives(spec, rank: int, iters: int, results, comm=None) -> None:
    import torch
    from gateway.executor.parallel import create_communicator
    torch.set_num_threads(1)
    comm = comm or create_communicator(spec, rank)
    out = {}
    for op, shape, dtype in SHAPES:
        t = torch.randn(shape).to(getattr(torch, dtype))
        samples = []
        for i in range(iters + 20):
            start = time.perf_counter()
            getattr(comm, op)(t)
            if i >= 20:
                samples.append((time.perf_counter() - start) * 1e6)
        samples.sort()
        out[f"{op}{list(shape)} {dtype}"] = (samples[len(samples) // 2], samples[int(len(samples) * 0.9)])
    comm.close()
    if results is not None:
        results.put(out)


def bench_collectives(iters: int) -> None:
    import multiprocessing as mp
    from gateway.executor.parallel import create_communicator, make_spec
    ctx = mp.get_context("spawn")
    table = {}
    for backend in ("shm", "gloo"):
        spec = make_spec(backend, 2, 60, 16 * 2**20)
        results = ctx.Queue()
        # shm: rank 0 creates the segment before the peer attaches; gloo: both join the group
        comm = create_communicator(spec, 0) if backend == "shm" else None
        peer = ctx.Process(target=_time_collectives, args=(spec, 1, iters, None))
        peer.start()
        _time_collectives(spec, 0, iters, results, comm)
        peer.join()
        table[backend] = results.get()
    print(f"{'collective (2 ranks, rank 0)':34s} {'shm p50/p90 us':>18s} {'gloo p50/p90 us':>18s}")
    for key in table["shm"]:
        s, g = table["shm"][key], table["gloo"][key]
        print(f"{key:34s} {s[0]:8.0f} /{s[1]:7.0f}  {g[0]:8.0f} /{g[1]:7.0f}")


# ---- throughput -------------------------------------------------------------------------------
def run_one(tp: int, concurrency: int, output_len: int, input_len: int, dtype: str, threads: int | None,
            pp: int = 1) -> dict:
    import torch
    from gateway.engine.llm import LLM
    from gateway.sampling.params import SamplingParams
    num_prompts = max(concurrency, 4)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 49000, (num_prompts, input_len), generator=g).tolist()
    with LLM(None, tensor_parallel_size=tp, pipeline_parallel_size=pp, dtype=dtype, max_num_seqs=concurrency,
             num_threads=threads, max_model_len=1024, kv_cache_memory="512MiB") as llm:
        timer = _CommTimer(llm.core.runner)
        llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))   # warm-up
        timer.reset()
        stage = getattr(llm.core.runner, "runner", None) if pp > 1 else None   # the driver's (last) stage
        if stage is not None:
            stage.reset_stats()
            control_before = llm.core.runner.state.control.bytes_sent
        params = SamplingParams(max_tokens=output_len, min_tokens=output_len, ignore_eos=True, temperature=0)
        start = time.perf_counter()
        results = llm.generate(prompts, params)
        elapsed = time.perf_counter() - start
        pipeline = {}
        if stage is not None:
            stats = stage.stats()
            pipeline = dict(steps=stats["steps"], stage_bytes_per_step=stats["bytes_received"] / stats["steps"],
                            control_bytes_per_step=(llm.core.runner.state.control.bytes_sent - control_before)
                            / stats["steps"], driver_wait_share=stats["wait_s"] / elapsed,
                            driver_compute_share=stats["compute_s"] / elapsed)
    out_tokens = sum(r.completion_tokens for r in results)
    return dict(tp=tp, pp=pp, concurrency=concurrency, out_tok_s=out_tokens / elapsed, elapsed_s=elapsed,
                comm_s=timer.seconds, comm_calls=timer.calls, **pipeline)


class _CommTimer:
    """Wraps rank 0's communicator to add up time spent in collectives (peer waits included)."""

    def __init__(self, runner) -> None:
        self.seconds, self.calls = 0.0, 0
        comm = getattr(runner, "comm", None)
        if comm is None:
            return
        for name in ("all_reduce", "gather"):
            setattr(comm, name, self._wrap(getattr(comm, name)))

    def _wrap(self, fn):
        def timed(t):
            start = time.perf_counter()
            try:
                return fn(t)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1
        return timed

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def bench_throughput(args) -> None:
    rows, configs = [], [(tp, pp) for pp in args.pp for tp in args.tp]
    for concurrency in args.concurrency:
        for tp, pp in configs:
            for _ in range(args.repeat):
                cmd = [sys.executable, __file__, "--run", str(tp), str(concurrency), "--output-len",
                       str(args.output_len), "--input-len", str(args.input_len), "--dtype", args.dtype,
                       "--pp", str(pp)]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                row = json.loads(out.strip().splitlines()[-1])
                rows.append(row)
                extra = ""
                if "steps" in row:
                    extra = (f"; {row['stage_bytes_per_step'] / 1024:.1f} KiB between stages + "
                             f"{row['control_bytes_per_step'] / 1024:.1f} KiB control per step, driver stage "
                             f"waits {100 * row['driver_wait_share']:.0f}% / computes "
                             f"{100 * row['driver_compute_share']:.0f}%")
                print(f"tp={row['tp']} pp={row['pp']} concurrency={row['concurrency']:3d}: {row['out_tok_s']:7.1f} "
                      f"output tok/s ({row['elapsed_s']:.1f} s; rank-0 collectives {row['comm_s']:.2f} s in "
                      f"{row['comm_calls']} calls = {100 * row['comm_s'] / row['elapsed_s']:.0f}%{extra})", flush=True)
    print("\nmedian output tok/s")
    first, last = configs[0], configs[-1]
    for concurrency in args.concurrency:
        by = {c: statistics.median(r["out_tok_s"] for r in rows if (r["tp"], r["pp"]) == c
                                   and r["concurrency"] == concurrency) for c in configs}
        ratio = f"  {_name(last)}/{_name(first)} = {by[last] / by[first]:.2f}" if len(by) > 1 else ""
        print(f"concurrency {concurrency:3d}: " + ", ".join(f"{_name(c)} {v:.1f}" for c, v in by.items()) + ratio)


def _name(config: tuple[int, int]) -> str:
    return f"tp{config[0]}" + (f"pp{config[1]}" if config[1] > 1 else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--collectives", action="store_true")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--pp", type=int, nargs="+", default=[1])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=None, help="per rank (default: cores // (tp x pp))")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--run", type=int, nargs=2, metavar=("TP", "CONCURRENCY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.collectives:
        bench_collectives(args.iters)
    elif args.run:
        print(json.dumps(run_one(*args.run, args.output_len, args.input_len, args.dtype, args.threads,
                                 args.pp[0])))
    else:
        bench_throughput(args)


if __name__ == "__main__":
    main()
