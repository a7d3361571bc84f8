"""Quantized linears (gateway.kernels.quant.quant_linear, C kernels) against the bf16 path the
model takes without them (oneDNN: mkldnn._linear_pointwise on a prepacked weight), on the
default model's shapes (SmolLM2-135M: hidden 576, intermediate 1536, 9 q / 3 kv heads of 64,
vocab 49152; q|k|v and gate|up are merged). Per call: µs (median of rounds, the two paths
alternated so a loaded box hurts both alike) and GB/s of weight bytes; then the sum over one
decode step (30 layers + the LM head) at M=1.

    PYTHONPATH=. python bench/quant_kernels.py [--m 1,2,4,8,16,32,64,256] [--rounds 60]
        [--impl c|gemm|vnni|bf16|torch] [--threads N] [--step R]
    PYTHONPATH=. python bench/quant_kernels.py --gemm [--m 1,16,64,256,512]   # the crossover table

--gemm: GFLOP/s (2 M N K / time) of every kernel on one weight (Q4_1 codes) per shape K x N
(576x576, 576x1536, 1536x576, 576x192) and M: the W8A8 kernel ("gemm", on the weight's int8
per-channel copy), oneDNN bf16, the packed bf16-activation kernel ("bf16") and the int8-per-block
one ("vnni"), alternated; quant.GEMM_MIN_ROWS is set from where gemm overtakes bf16.

Measured 2026-12-03 (AMD EPYC Zen 4, 2 cores, shared box; 2 threads, median of 15-40 alternated
samples). --impl vnni (int8 activations) beats oneDNN bf16 at every M tried: 2.3-3.1x at M=1
(qkv 9.1 vs 26.2 µs, o 11.6 vs 32.6, gate_up 31.5 vs 75.5, down 14.6 vs 33.9, head 1218 vs
3262), 1.0-1.8x at M=16, 0.94-1.27x at M=256. --impl bf16 (bf16 activations, the default for
4-bit codes: int8 activations changed the default model's greedy chat answers, see quant.py):
2.0-2.2x at M=1 (qkv 12.1 vs 26.8, gate_up 34.8 vs 70.4, down 19.9 vs 42.7), 0.9-1.15x at
M=16, 0.81-0.94x at M=64-256, so a prefill chunk runs up to ~20% slower than oneDNN bf16 on
these shapes; dequantizing to bf16 per call for oneDNN would cost more than that gap (a
weight's whole bf16 copy written per call), so there is one path at every M. Whole decode
step's linears, weights streamed from memory: vnni 7.1 ms vs bf16 20.5 ms (single runs vary
±20% with the box's load; 1 thread: vnni 6.9, the bf16 kernel 7.7-8.1, oneDNN 26.7 ms)."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gateway.kernels import quant

LAYERS = 30
# name: (N, K, qtype, calls per decode step)
SHAPES = {"qkv": (960, 576, "q4_1", LAYERS), "kv": (192, 576, "q4_1", 0), "o": (576, 576, "q4_1", LAYERS),
          "gate_up": (3072, 576, "q4_1", LAYERS), "down": (576, 1536, "q4_1", LAYERS),
          "head": (49152, 576, "q8_0", 1)}


def weight(n: int, k: int, qtype: str) -> quant.PackedWeight:
    w = torch.randn(n, k) * 0.05
    if qtype == "q8_0":   # q8_0 == int8 codes with a scale per 32; per-channel int8 has the same layout
        return quant.PackedWeight("q8_0", (n, k), quant.quantize(w, "int8").data)
    return quant.PackedWeight(qtype, (n, k), quant.quantize(w, "int4").data)   # q4_1's layout


def timed(fn, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner * 1e6


def bench_shape(n, k, qtype, m, rounds, impl):
    """Median over `rounds` alternated samples of a few calls each: a sample that a time slice
    lost to another process (ms, on a shared box) is an outlier the median ignores."""
    pw = weight(n, k, qtype)
    dense = torch.randn(n, k).bfloat16()
    packed_dense = torch.ops.mkldnn._reorder_linear_weight(dense, None)
    x = torch.randn(m, k).bfloat16()
    inner = max(1, min(20, int(3e5 / (n * k * max(m, 4) / 32 + 1e3))))
    runs = {"quant": lambda: quant.quant_linear(x, pw, impl=impl),
            "bf16": lambda: torch.ops.mkldnn._linear_pointwise(x, packed_dense, None, "none", [], "")}
    samples = {name: [] for name in runs}
    for fn in runs.values():
        fn()
    for _ in range(rounds):   # alternate A/B
        for name, fn in runs.items():
            samples[name].append(timed(fn, inner))
    return statistics.median(samples["quant"]), statistics.median(samples["bf16"]), pw.nbytes(), dense.numel() * 2


def bench_step(rounds: int, impl: str) -> tuple[float, float, int, int]:
    """One decode step's linears as the model runs them (M=1): 30 layers of distinct weights
    (96 MB packed, 190 MB bf16: more than the L3, so they stream from memory as in serving) and
    the head. Median ms of quant vs bf16 steps, alternated; and the bytes each step reads."""
    order = ["qkv", "o", "gate_up", "down"]
    layers = [{name: weight(*SHAPES[name][:3]) for name in order} for _ in range(LAYERS)]
    head = weight(*SHAPES["head"][:3])
    dense = [{name: torch.ops.mkldnn._reorder_linear_weight(torch.randn(*SHAPES[name][:2]).bfloat16(), None)
              for name in order} for _ in range(LAYERS)]
    dense_head = torch.ops.mkldnn._reorder_linear_weight(torch.randn(*SHAPES["head"][:2]).bfloat16(), None)
    x = {k: torch.randn(1, k).bfloat16() for k in (576, 1536)}

    def quant_step():
        for layer in layers:
            for name in order:
                quant.quant_linear(x[SHAPES[name][1]], layer[name], impl=impl)
        quant.quant_linear(x[576], head, impl=impl)

    def bf16_step():
        for layer in dense:
            for name in order:
                torch.ops.mkldnn._linear_pointwise(x[SHAPES[name][1]], layer[name], None, "none", [], "")
        torch.ops.mkldnn._linear_pointwise(x[576], dense_head, None, "none", [], "")

    samples = {"quant": [], "bf16": []}
    for _ in range(rounds):
        samples["quant"].append(timed(quant_step, 1) / 1e3)
        samples["bf16"].append(timed(bf16_step, 1) / 1e3)
    qbytes = sum(pw.nbytes() for layer in layers for pw in layer.values()) + head.nbytes()
    bbytes = sum(2 * n * k * (LAYERS if name != "head" else 1) for name, (n, k, _, c) in SHAPES.items() if c)
    return statistics.median(samples["quant"]), statistics.median(samples["bf16"]), qbytes, bbytes


GEMM_SHAPES = [(576, 576), (576, 1536), (1536, 576), (576, 192)]   # K x N


def bench_gemm(ms: list[int], rounds: int) -> None:
    print(f"{'K x N':>10} {'M':>4}  GFLOP/s: {'gemm':>7} {'oneDNN':>7} {'bf16':>7} {'vnni':>7}   gemm/oneDNN gemm/bf16")
    for k, n in GEMM_SHAPES:
        pw = weight(n, k, "q4_1")
        q8 = quant.gemm_weight(pw)
        dense = torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k).bfloat16(), None)
        for m in ms:
            x = torch.randn(m, k).bfloat16()
            inner = max(1, min(50, int(2e6 / (n * k * m / 32 + 1e4))))
            runs = {"gemm": lambda: quant.quant_linear(x, q8, impl="gemm"),
                    "oneDNN": lambda: torch.ops.mkldnn._linear_pointwise(x, dense, None, "none", [], ""),
                    "bf16": lambda: quant.quant_linear(x, pw, impl="bf16"),
                    "vnni": lambda: quant.quant_linear(x, pw, impl="vnni")}
            samples = {name: [] for name in runs}
            for fn in runs.values():
                fn()
            for _ in range(rounds):
                for name, fn in runs.items():
                    samples[name].append(timed(fn, inner))
            rate = {name: 2 * m * n * k / statistics.median(v) / 1e3 for name, v in samples.items()}
            print(f"{k:>5}x{n:<5} {m:4}           {rate['gemm']:7.1f} {rate['oneDNN']:7.1f} {rate['bf16']:7.1f} "
                  f"{rate['vnni']:7.1f}   {rate['gemm'] / rate['oneDNN']:10.2f} {rate['gemm'] / rate['bf16']:9.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", default="1,2,4,8,16,32,64,256")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--impl", default="c", choices=["c", "gemm", "vnni", "bf16", "torch"])
    parser.add_argument("--gemm", action="store_true", help="the GFLOP/s table of every kernel (see above)")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--threads", type=int, default=0, help="torch/OpenMP threads (0: torch's default)")
    parser.add_argument("--step", type=int, default=15, help="rounds of the whole-step benchmark (0: skip)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.gemm:
        print(f"threads {torch.get_num_threads()}")
        return bench_gemm(list(map(int, args.m.split(","))), args.rounds)
    print(f"threads {torch.get_num_threads()}, impl {args.impl}")
    print(f"per call, hot weights (one weight called repeatedly, so from cache where it fits):")
    print(f"{'shape':8} {'N':>6} {'K':>5} {'type':5} {'M':>4} {'quant µs':>9} {'GB/s':>6} {'bf16 µs':>9} {'GB/s':>6} {'bf16/quant':>10}")
    step = {"quant": 0.0, "bf16": 0.0}
    for name in args.shapes.split(","):
        n, k, qtype, calls = SHAPES[name]
        for m in map(int, args.m.split(",")):
            tq, tb, qbytes, bbytes = bench_shape(n, k, qtype, m, args.rounds, args.impl)
            print(f"{name:8} {n:6} {k:5} {qtype:5} {m:4} {tq:9.1f} {qbytes / tq / 1e3:6.1f} {tb:9.1f} "
                  f"{bbytes / tb / 1e3:6.1f} {tb / tq:10.2f}", flush=True)
            if m == 1:
                step["quant"] += calls * tq
                step["bf16"] += calls * tb
    if args.step:
        tq, tb, qb, bb = bench_step(args.step, args.impl)
        print(f"decode step, weights streamed from memory (M=1, median of {args.step}): quant {tq:.2f} ms "
              f"({qb / tq / 1e6:.1f} GB/s of {qb / 1e6:.0f} MB), bf16 {tb:.2f} ms ({bb / tb / 1e6:.1f} GB/s of {bb / 1e6:.0f} MB)")
    if step["quant"]:
        print(f"sum of the hot per-call figures (M=1, {LAYERS} layers of qkv+o+gate_up+down, + head): quant {step['quant'] / 1e3:.2f} ms,"
              f" bf16 {step['bf16'] / 1e3:.2f} ms")


if __name__ == "__main__":
    main()
