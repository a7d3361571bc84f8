"""Cold-, warm- and hot-cache timing of the bf16 decode attention kernel (cpu/decode_bf16.c), A/B.

In a real decode step each layer's KV cache was last read one model step earlier, with the other
layers' caches and weights read in between, so paged_decode_attention_bf16 streams from DRAM.
This script compiles the current gateway/kernels/cpu/decode_bf16.c alone into a temporary .so
(the flags of cpu_ops.py), and with --baseline / --baseline-src a second one (say the git HEAD
sources), both loaded into this process. For each shape (batch x context; SmolLM2-135M heads by
default, each sequence's blocks scattered over a large paged cache) it alternates the calls
A, B, A, B ... on the same data, in modes:
  cold  a --flush-mb buffer is read before every call (evicts L1-L3: the real decode case);
  warm  the same call runs just before (what still fits in L2/L3 is cached);
  hot   every sequence reads the first sequence's blocks (in L1/L2: compute only).
It prints the median and the 10th percentile of ms per call, the B/A ratio of the medians and
the largest difference between the outputs. --pages 4k,huge also runs on a copy of the caches
madvised MADV_HUGEPAGE (transparent huge pages), alternated with the 4k one. Alternating in one
process keeps the A/B ratio fair on a noisy machine, where the absolute figures move 10-30%;
--clock thread (with OMP_NUM_THREADS=1) times this thread's CPU time, blind to other processes.

    python bench/decode_cold.py                                    # current kernel only
    mkdir -p /tmp/base && git show HEAD:gateway/kernels/cpu/decode_bf16.c > /tmp/base/decode_bf16.c
    git show HEAD:gateway/kernels/cpu/common.h > /tmp/base/common.h
    python bench/decode_cold.py --baseline-src /tmp/base --pages 4k,huge
    python bench/decode_cold.py --baseline /tmp/base.so --shapes 64x300 --modes cold --reps 400
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import subprocess
import tempfile
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "gateway" / "kernels" / "cpu"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno"]


def build(src_dir: Path) -> ctypes.CDLL:
    """decode_bf16.c (with its common.h) of src_dir as a shared library, cached by content."""
    text = (src_dir / "decode_bf16.c").read_bytes() + (src_dir / "common.h").read_bytes()
    target = Path(tempfile.gettempdir()) / f"decode-cold-{hashlib.sha256(text).hexdigest()[:12]}.so"
    if not target.exists():
        subprocess.run(["cc", *FLAGS, str(src_dir / "decode_bf16.c"), "-o", str(target), "-lm"], check=True)
    return load(target)


def load(path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(Path(path).resolve()))
    lib.paged_decode_attention_bf16.restype = ctypes.c_int
    lib.paged_decode_attention_bf16.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                                                ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p] + \
        [ctypes.c_int64] * 5 + [ctypes.c_float]
    return lib


def cache(shape, g, huge):
    """A random bf16 tensor; huge: its pages madvised MADV_HUGEPAGE (14) before the first touch."""
    t = torch.empty(shape, dtype=torch.bfloat16)
    if huge:
        start = t.data_ptr() & ~4095
        ctypes.CDLL(None).madvise(ctypes.c_void_p(start), ctypes.c_size_t(t.data_ptr() + t.nbytes - start), 14)
    return t.copy_(torch.randn(shape, generator=g))


def workload(batch, context, heads, kv_heads, head_dim, block_size, cache_blocks, huge, seed=0):
    """q, caches [blocks, block_size, kv_heads, head_dim], block tables (scattered), seq_lens."""
    g = torch.Generator().manual_seed(seed)
    nblk = -(-context // block_size)
    num_blocks = max(cache_blocks, batch * nblk)
    kc = cache((num_blocks, block_size, kv_heads, head_dim), g, huge)
    vc = cache((num_blocks, block_size, kv_heads, head_dim), g, huge)
    tables = torch.randperm(num_blocks, generator=g)[: batch * nblk].view(batch, nblk).to(torch.int32).contiguous()
    q = torch.randn(batch, heads, head_dim, generator=g).bfloat16()
    return q, kc, vc, tables, torch.full((batch,), context, dtype=torch.int32)


def caller(lib, q, kc, vc, tables, lens, out):
    b, h, d = q.shape
    args = (q.data_ptr(), q.stride(0), kc.data_ptr(), vc.data_ptr(), tables.data_ptr(), tables.shape[1],
            lens.data_ptr(), out.data_ptr(), b, h, kc.shape[2], d, kc.shape[1], d ** -0.5)
    return lambda keep=(q, kc, vc, tables, lens, out): lib.paged_decode_attention_bf16(*args)   # keeps them alive


def pct(xs, p):
    return sorted(xs)[min(len(xs) - 1, int(p * len(xs)))] * 1e3


def time_mode(mode, calls, reps, flush, clock):
    times = [[] for _ in calls]
    for _ in range(reps):
        for k, call in enumerate(calls):
            if mode == "cold":
                flush.sum()
            else:
                call()
            t = clock()
            call()
            times[k].append(clock() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", help="A: a built .so with paged_decode_attention_bf16")
    ap.add_argument("--baseline-src", help="A: a folder holding decode_bf16.c and common.h, built here")
    ap.add_argument("--shapes", default="64x300,8x2000,1x4096", help="batch x context, comma-separated")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--cache-blocks", type=int, default=5800, help="paged cache size the blocks are drawn from")
    ap.add_argument("--reps", type=int, default=200, help="timed calls per kernel and mode")
    ap.add_argument("--flush-mb", type=int, default=128)
    ap.add_argument("--modes", default="cold,warm,hot")
    ap.add_argument("--pages", default="4k", help="4k, huge (madvised caches) or 4k,huge")
    ap.add_argument("--clock", choices=["wall", "thread"], default="wall")
    args = ap.parse_args()
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    base = load(args.baseline) if args.baseline else build(Path(args.baseline_src)) if args.baseline_src else None
    kernels = [("A", base), ("B", build(SRC))] if base else [("cur", build(SRC))]
    pages = args.pages.split(",")
    flush = torch.ones(args.flush_mb * 2**20 // 4)
    print(f"heads {args.heads}/{args.kv_heads} dim {args.head_dim} block {args.block_size}, {args.reps} calls each, "
          f"{torch.get_num_threads()} threads; ms per call: median (p10)")
    for shape in args.shapes.split(","):
        batch, context = map(int, shape.split("x"))
        dims = (batch, context, args.heads, args.kv_heads, args.head_dim, args.block_size, args.cache_blocks)
        datas = {p: workload(*dims, p == "huge") for p in pages}
        runs = [(f"{name}{'/' + p if len(pages) > 1 else ''}", lib, p) for p in pages for name, lib in kernels]
        for mode in args.modes.split(","):
            outs, calls = [], []
            for _, lib, p in runs:
                q, kc, vc, tables, lens = datas[p]
                if mode == "hot":
                    tables = tables[:1].expand_as(tables).contiguous()
                outs.append(torch.zeros_like(q))
                calls.append(caller(lib, q, kc, vc, tables, lens, outs[-1]))
                assert calls[-1]() == 0, "kernel returned -1 (no AVX512-BF16?)"
            diff = max((o.float() - outs[0].float()).abs().max().item() for o in outs)
            times = time_mode(mode, calls, args.reps, flush, clock)
            med = [pct(ts, .5) for ts in times]
            cols = "  ".join(f"{name} {m:.3f} ({pct(ts, .1):.3f})" for (name, _, _), m, ts in zip(runs, med, times))
            nk = len(kernels)
            ratio = "".join(f"  B/A {med[i + 1] / med[i]:.2f}" for i in range(0, len(med), nk)) if base else ""
            if len(pages) > 1:
                ratio += f"  huge/4k {med[-1] / med[nk - 1]:.2f}"
            print(f"{batch:3d} x {context:5d} {mode}: {cols}{ratio}  maxdiff {diff:.2g}", flush=True)


if __name__ == "__main__":
    main()
