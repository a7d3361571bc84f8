"""Ahead-of-time compilation of every gateway Triton kernel for CUDA targets, without a GPU.

Owns the list of (kernel, signature, constexpr) specs the dispatch really launches, built from
the same *_config functions the launchers use, and compiles each through triton.compile with
an ASTSource and a GPUTarget down to a cubin (ptxas ships with the triton wheel). That
catches what TRITON_INTERPRET lets through: tl.dot shape limits, dtype rules, shared-memory
overruns. Side effects: triton's on-disk cache (TRITON_CACHE_DIR) only.

Run it in a process where TRITON_INTERPRET is unset (the kernels must be JITFunctions):
    python -m gateway.kernels.triton_aot --arch 90 [--quick]
It prints one JSON object per spec and exits non-zero if any failed."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget

from gateway.kernels import triton_attention as attn
from gateway.kernels import triton_elementwise as elem
from gateway.kernels import triton_norm as norm

# Opt-in dynamic shared memory per block.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
TY = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
FLOAT_ARGS = {"qk_scale", "eps"}


@dataclass
class Spec:
    name: str
    kernel: object
    pointers: dict          # pointer argument -> element type ("fp16", "i32", ...)
    constexprs: dict
    options: dict


def _signature(spec: Spec) -> tuple[dict, dict]:
    """Triton signature plus the divisibility hints the runtime would infer for aligned
    tensors and strides that are multiples of 16 (true of every stride we launch with)."""
    signature, attrs = {}, {}
    for i, name in enumerate(spec.kernel.arg_names):
        if name in spec.constexprs:
            signature[name] = "constexpr"
        elif name in spec.pointers:
            signature[name] = "*" + spec.pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name in FLOAT_ARGS else "i32"
            if name.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def attention_specs(dtype, head_dim: int, block_size: int, group: int) -> list[Spec]:
    t = TY[dtype]
    tables = dict(block_tables="i32", query_start_loc="i32", seq_lens="i32")
    io = dict(q_ptr=t, k_cache=t, v_cache=t, out_ptr=t, **tables)
    tag = f"{t}_d{head_dim}_bs{block_size}_g{group}"
    specs = [Spec(f"prefill_{tag}", attn._prefill_kernel, io,
                  *attn.prefill_config(dtype, head_dim, block_size, group, interpret=False))]
    for direct in (False, True):
        ptrs = dict(io, part_out="fp32", part_lse="fp32")
        if direct:      # the launcher passes `out` as the unused scratch pointers
            ptrs.update(part_out=t, part_lse=t)
        consts, opts = attn.decode_config(dtype, head_dim, block_size, group, direct, interpret=False)
        specs.append(Spec(f"decode_{'direct' if direct else 'split'}_{tag}", attn._decode_kernel,
                          ptrs, consts, opts))
    return specs


def reduce_spec(dtype, head_dim: int, splits_pad: int) -> Spec:
    consts = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim), SPLITS_PAD=splits_pad)
    return Spec(f"reduce_{TY[dtype]}_d{head_dim}_s{splits_pad}", attn._reduce_kernel,
                dict(part_out="fp32", part_lse="fp32", out_ptr=TY[dtype]), consts, dict(num_warps=4))


def elementwise_specs(dtype, num_heads: int, num_kv_heads: int, head_dim: int, hidden: int) -> list[Spec]:
    t = TY[dtype]
    tag = f"{t}_h{num_heads}_kv{num_kv_heads}_d{head_dim}"
    specs = [
        Spec(f"store_kv_{tag}", elem._store_kv_kernel,
             dict(key_ptr=t, value_ptr=t, k_cache=t, v_cache=t, slot_ptr="i64"),
             *elem.store_kv_config(num_kv_heads, head_dim)),
        Spec(f"rotary_{tag}", elem._rotary_kernel,
             dict(pos_ptr="i64", q_ptr=t, k_ptr=t, cache_ptr="fp32"),
             *elem.rotary_config(num_heads, num_kv_heads, head_dim)),
        Spec(f"silu_and_mul_{t}_i{hidden * 4}", elem._silu_and_mul_kernel,
             dict(x_ptr=t, out_ptr=t), *elem.silu_config(hidden * 4)),
    ]
    for residual in (False, True):
        specs.append(Spec(f"rms_norm_{t}_n{hidden}_res{int(residual)}", norm._rms_norm_kernel,
                          dict(x_ptr=t, res_ptr=t, w_ptr=t, out_ptr=t, sum_ptr=t),
                          *norm.norm_config(hidden, dtype, residual)))
    return specs


def all_specs(quick: bool = False) -> list[Spec]:
    """Every dtype x head dim, with block sizes 16/32/64 and GQA groups 1/3/8 rotated through
    them (block size and group only change index arithmetic, not tile shapes). quick: bf16 only."""
    dtypes = [torch.bfloat16] if quick else [torch.float16, torch.bfloat16, torch.float32]
    specs, i = [], 0
    for dtype in dtypes:
        for head_dim in (64, 128):
            specs += attention_specs(dtype, head_dim, (16, 32, 64)[i % 3], (3, 1, 8)[i % 3])
            specs.append(reduce_spec(dtype, head_dim, (2, 16)[i % 2]))
            i += 1
        # SmolLM2-135M (9/3 heads, d64, hidden 576) and a Llama-8B-like shape (32/8, d128, 4096).
        specs += elementwise_specs(dtype, 9, 3, 64, 576) + elementwise_specs(dtype, 32, 8, 128, 4096)
    return specs


def _describe(exc: BaseException) -> str:
    """The exception chain, innermost last: a CompilationError names the call site while
    its __cause__ holds the reason (e.g. the tl.dot shape check)."""
    parts = []
    while exc is not None and len(parts) < 5:
        parts.append(f"{type(exc).__name__}: {exc}"[-1500:])
        exc = exc.__cause__ or exc.__context__
    return "\n--- caused by ---\n".join(parts)


def compile_spec(spec: Spec, arch: int) -> dict:
    """Compile one spec; report the last stage reached, shared memory and any error."""
    signature, attrs = _signature(spec)
    src = triton.compiler.ASTSource(fn=spec.kernel, signature=signature,
                                    constexprs=spec.constexprs, attrs=attrs)
    start = time.perf_counter()
    result = dict(name=spec.name, arch=arch)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(spec.options))
    except Exception as exc:    # report every failure, keep compiling the rest
        return dict(result, ok=False, error=_describe(exc))
    stages = [s for s in ("ttir", "ttgir", "llir", "ptx", "cubin") if s in compiled.asm]
    shared = compiled.metadata.shared
    limit = SHARED_LIMIT.get(arch)
    ok = stages[-1:] == ["cubin"] and (limit is None or shared <= limit)
    ptx = compiled.asm.get("ptx", "")
    # Which tensor-core instruction the dots lowered to (None: FMA only).
    mma = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else None
    return dict(result, ok=ok, stage=stages[-1] if stages else None, shared=shared,
                shared_limit=limit, mma=mma, seconds=round(time.perf_counter() - start, 2))


def _parse_overrides(pairs: list[str]) -> dict:
    """KEY=INT pairs that replace constexprs, e.g. to show a bad tile shape fails to compile."""
    return {key: int(value) for key, value in (pair.split("=", 1) for pair in pairs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")
    parser.add_argument("--quick", action="store_true", help="bf16 specs only")
    parser.add_argument("--only", default="", help="compile only specs whose name contains this")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=INT",
                        help="override a constexpr in the selected specs (negative controls)")
    args = parser.parse_args(argv)
    overrides = _parse_overrides(args.set)
    if attn.INTERPRET:
        parser.error("TRITON_INTERPRET is set: kernels are interpreted and cannot be compiled")
    failed = 0
    for arch in args.arch or [90, 80]:
        for spec in all_specs(args.quick):
            if args.only in spec.name:
                spec.constexprs.update(overrides)
                report = compile_spec(spec, arch)
                failed += not report["ok"]
                print(json.dumps(report), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
