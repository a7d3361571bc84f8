"""Where one decode step's milliseconds go: B sequences decoding on the default model, with
a wall-clock timer around each entry point the layers call (kernel dispatch, the quantized
linears, batch building, logits, sampler). Timers nest: model.forward includes the kernels
under it, runner.execute includes everything. torch.profiler cannot see the C kernels
(ctypes calls), this can.

    python bench/step_breakdown.py --batch 1                      # packed GGUF (auto)
    python bench/step_breakdown.py --batch 1 --quantization none  # the same, dequantized to bf16
    python bench/step_breakdown.py --batch 64 --gemm-min-rows 0   # batched products without W8A8
"""
import argparse
import collections
import time

import torch
from gateway.engine.llm import LLM
from gateway.engine.messages import EngineRequest
from gateway.sampling.params import SamplingParams
import gateway.kernels as K
from gateway.kernels import quant_cpu, quant
import gateway.executor.model_runner as MR
from gateway.models.layers import Linear

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--quantization", default="auto", choices=["auto", "none", "int8", "int4"])
ap.add_argument("--steps", type=int, default=64)
ap.add_argument("--gemm-min-rows", type=int, default=None,
                help="rows from which products take the W8A8 kernel (default quant.GEMM_MIN_ROWS, off unless GATEWAY_QUANT_KERNELS=w8a8; 0: never)")
args = ap.parse_args()
if args.gemm_min_rows is not None:
    quant.GEMM_MIN_ROWS = args.gemm_min_rows or None
acc, calls = collections.Counter(), collections.Counter()


def wrap(owner, name, label=None):
    fn, label = getattr(owner, name), label or name

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            acc[label] += time.perf_counter() - start
            calls[label] += 1
    setattr(owner, name, timed)


t_load = time.perf_counter()
llm = LLM(None, quantization=args.quantization)
print(f"model built in {time.perf_counter() - t_load:.1f} s")
runner = llm.core.runner
for n in ["rms_norm", "fused_add_rms_norm", "silu_and_mul", "rotary_embedding", "store_kv", "paged_attention"]:
    wrap(K, n)
wrap(Linear, "forward", "Linear.forward (any weights)")
wrap(quant_cpu, "linear", "quant_linear(C)")
wrap(quant, "quant_embedding")
wrap(MR, "build_flat_batch")
wrap(MR.SamplingBatch, "build", "SamplingBatch.build")
wrap(runner.model, "forward", "model.forward")
wrap(runner.model, "compute_logits", "compute_logits")
wrap(runner, "sampler", "sampler")
wrap(runner, "execute", "runner.execute")
g = torch.Generator().manual_seed(0)
params = SamplingParams(max_tokens=args.steps + 20, min_tokens=args.steps + 20, ignore_eos=True, temperature=0)
for i in range(args.batch):
    llm.core.add_request(EngineRequest(f"r{i}", torch.randint(100, 40000, (128,), generator=g).tolist(), params))
for _ in range(10):
    llm.core.step()
acc.clear(); calls.clear()
t0 = time.perf_counter()
for _ in range(args.steps):
    llm.core.step()
total = (time.perf_counter() - t0) / args.steps * 1e3
print(f"batch {args.batch}, --quantization {args.quantization}, W8A8 from {quant.GEMM_MIN_ROWS} rows: "
      f"{total:.2f} ms per decode step (core.step)")
for k, v in sorted(acc.items(), key=lambda kv: -kv[1]):
    print(f"  {k:<24} {v / args.steps * 1e3:7.2f} ms  {calls[k] / args.steps:6.1f} calls/step")
