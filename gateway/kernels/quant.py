"""Quantized weights kept packed: the PackedWeight type, packing (GGUF blocks as stored, or a
float weight quantized to int8 / int4 at load), row slicing and merging, and the two products
the models call, quant_linear and quant_embedding.

`dequantize` is THE reference: every kernel result is checked against it (tests/
test_quant_kernels.py). The data layout (16 output rows per tile, float16 scales and mins) is
described in quant_layout.py; callers treat PackedWeight.data as opaque. quant_linear runs the C
kernels (bf16 x: cpu/quant_bf16.c for 4-bit codes, cpu/quant_gemv.c for 8-bit ones; fp32 x:
cpu/quant_f32.c; through quant_cpu.py and cpu_ops' library) where they apply and otherwise this module's torch
reference (dequantize, then matmul), so results never depend on whether the C build succeeded."""

from __future__ import annotations

from dataclasses import dataclass

import os
import weakref

import numpy as np
import torch
import torch.nn.functional as F

from gateway.kernels import quant_cpu
from gateway.kernels import quant_layout as layout

GGUF_QTYPES = frozenset(layout.GGUF_BLOCK_BYTES)
QTYPES = GGUF_QTYPES | {"int8", "int4"}
IMPLS = ("c", "gemm", "vnni", "bf16", "f32", "torch")
_IMPL = os.environ.get("GATEWAY_QUANT_KERNELS", "c")   # "torch" forces the reference everywhere
_W8A8 = _IMPL == "w8a8"   # the default kernels plus W8A8 for batched products (see GEMM_MIN_ROWS)
if _W8A8:
    _IMPL = "c"
if _IMPL not in IMPLS:
    raise ImportError(f"GATEWAY_QUANT_KERNELS={_IMPL!r}: one of {', '.join(IMPLS)}")
# The default C kernel for bf16 activations: "bf16" for 4-bit codes, vnni (int8 activations)
# for 8-bit ones, which the bf16 kernel does not take. vnni is ~1.1x faster at one row and ~1.5x
# at 4-16 (bench/quant_kernels.py), but rounding activations to int8 per block of 32 changed
# greedy chat answers of the default model (Q4_1) against the dequantized path ("What is the
# capital of France?" no longer answered Paris); bf16 activations kept them. fp32 activations
# take "f32" (fp32 FMAs, no rounding of x): any rounding step turns a last-bit difference, e.g.
# a tensor-parallel sum's order, into a different greedy token, and fp32 models promise none.
C_KERNEL = "bf16"
# Batched bf16 products (M >= GEMM_MIN_ROWS: prefill chunks, many decodes) take "gemm" instead:
# W8A8, activations int8 per token, weights int8 per output channel, vpdpbusd with the whole K
# summed in int32 (cpu/quant_gemm.c). There the products are compute-bound and int8 does twice
# the multiply-adds per instruction of bf16. An "int8" weight (--quantization int8) is used as
# it is (exact: its scale is per channel already); any other type is requantized once to int8
# per channel (gemm_weight: not exact, |error| <= half the row's int8 step, a fraction of a
# 4-bit code's step) and that copy kept beside the packed weight. Crossover: bench/quant_kernels.py.
# Off by default (GEMM_MIN_ROWS None; GATEWAY_QUANT_KERNELS=w8a8 turns it on from GEMM_CROSSOVER
# rows): with it, a prompt's greedy answer depended on whether it hit the prefix cache (a hit
# leaves a prefill chunk under the crossover: bf16 activations instead of int8), which failed
# test_server_e2e's streamed == non-streamed check, and a fresh-clone run had a `gateway batch`
# process die of SIGSEGV that was not yet traced. Batch-invariant numerics come first.
GEMM_CROSSOVER = 16
GEMM_MIN_ROWS: int | None = GEMM_CROSSOVER if _W8A8 else None
# NATIVE_KERNELS (module attribute, computed at first read by __getattr__ below, which builds the
# C library): whether quant_linear runs in C here. Weight loading keeps `--quantization auto`
# dequantized without them (a dequantize per call is slower than the bf16 path).


def __getattr__(name: str):
    if name == "NATIVE_KERNELS":
        value = globals()["NATIVE_KERNELS"] = c_kernels_available()
        return value
    if name == "GEMM_KERNEL":   # whether the W8A8 kernel runs here (asked once, like NATIVE_KERNELS)
        value = globals()["GEMM_KERNEL"] = _IMPL != "torch" and quant_cpu.linear(
            torch.zeros(1, 32, dtype=torch.bfloat16), quantize(torch.ones(1, 32), "int8"), None, "gemm") is not None
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True, eq=False)
class PackedWeight:
    qtype: str                     # "q8_0" | "q4_0" | "q4_1" | "q4_k" | "q6_k" | "int8" | "int4"
    shape: tuple[int, int]         # (out_features N, in_features K) of the logical float weight
    data: dict[str, torch.Tensor]  # the kernels' layout (quant_layout.py)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data.values())


def _packed(qtype: str, shape, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> PackedWeight:
    return PackedWeight(qtype, (int(shape[0]), int(shape[1])), layout.tile(qtype, codes, d, m))


def pack_gguf(qtype: str, raw: np.ndarray, shape: tuple[int, int]) -> PackedWeight:
    """A GGUF tensor's bytes as stored (N rows of K/block ggml blocks) → the kernels' layout."""
    if qtype not in GGUF_QTYPES:
        raise ValueError(f"pack_gguf: {qtype!r} is not kept packed (one of {sorted(GGUF_QTYPES)})")
    codes, d, m = layout.parse_gguf(qtype, raw, tuple(shape))
    return _packed(qtype, shape, torch.from_numpy(np.ascontiguousarray(codes)), torch.from_numpy(d),
                   None if m is None else torch.from_numpy(m))


def _pad_k(w: torch.Tensor, value: float) -> torch.Tensor:
    return F.pad(w, (0, (-w.shape[1]) % 32), value=value)


def quantize(weight: torch.Tensor, qtype: str) -> PackedWeight:
    """int8: symmetric per output channel; int4: groups of 32 along K with scale and min. The
    scales are rounded to float16 first and the codes computed with the rounded scales."""
    w = weight.detach().float().cpu()
    if w.dim() != 2:
        raise ValueError(f"quantize: a 2-d weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    if qtype == "int8":
        s = (w.abs().amax(1, keepdim=True) / 127).to(torch.float16).float()
        s = torch.where(s > 0, s, torch.ones_like(s))
        codes = (torch.round(_pad_k(w, 0.0) / s).clamp(-127, 127) + 128).to(torch.uint8)
        return _packed("int8", w.shape, codes, s.expand(n, codes.shape[1] // 32), None)
    if qtype == "int4":
        g = _pad_k(w, float("nan")).view(n, -1, 32)
        lo = torch.nan_to_num(g, nan=float("inf")).amin(-1, keepdim=True)
        hi = torch.nan_to_num(g, nan=float("-inf")).amax(-1, keepdim=True)
        m = lo.to(torch.float16).float()
        d = ((hi - m) / 15).to(torch.float16).float()
        d = torch.where(d > 0, d, torch.ones_like(d))
        codes = torch.round((torch.nan_to_num(g, nan=0.0) - m) / d).clamp(0, 15)
        codes = torch.where(torch.isnan(g), torch.zeros_like(codes), codes)   # pad columns: code 0
        return _packed("int4", w.shape, codes.to(torch.uint8).view(n, -1), d[..., 0], m[..., 0])
    raise ValueError(f"quantize: unknown qtype {qtype!r} (int8 or int4)")


def dequantize(pw: PackedWeight) -> torch.Tensor:
    """float32 [N, K]: the logical weight, the reference every kernel is compared against."""
    n, k = pw.shape
    codes, d, m = layout.untile(pw.qtype, pw.data, n)
    block = layout.BLOCK[pw.qtype]
    d = d.float().repeat_interleave(block, dim=1)
    if m is None:
        w = (codes.float() - layout.W8_OFFSET[pw.qtype]) * d
    else:
        w = codes.float() * d + m.float().repeat_interleave(block, dim=1)
    return w[:, :k].contiguous()


def slice_rows(pw: PackedWeight, start: int, length: int) -> PackedWeight:
    """Rows [start, start + length): whole tiles are sliced as they are, else re-tiled."""
    n, k = pw.shape
    if not (0 <= start and length >= 1 and start + length <= n):
        raise ValueError(f"slice_rows: rows [{start}, {start + length}) of {n}")
    if start % layout.TILE == 0 and (length % layout.TILE == 0 or start + length == n):
        t0, t1 = start // layout.TILE, -(-(start + length) // layout.TILE)
        return PackedWeight(pw.qtype, (length, k), {key: v[t0:t1].clone() for key, v in pw.data.items()})
    codes, d, m = layout.untile(pw.qtype, pw.data, n)
    rows = slice(start, start + length)
    return _packed(pw.qtype, (length, k), codes[rows], d[rows], None if m is None else m[rows])


def concat_rows(pws: list[PackedWeight]) -> PackedWeight:
    """Row-wise concatenation (merged q|k|v, gate|up) of weights of one qtype and one K."""
    if not pws or len({(p.qtype, p.shape[1]) for p in pws}) != 1:
        raise ValueError("concat_rows: one or more weights of the same qtype and in_features")
    qtype, k, n = pws[0].qtype, pws[0].shape[1], sum(p.shape[0] for p in pws)
    if all(p.shape[0] % layout.TILE == 0 for p in pws[:-1]):
        return PackedWeight(qtype, (n, k), {key: torch.cat([p.data[key] for p in pws]) for key in pws[0].data})
    parts = [layout.untile(qtype, p.data, p.shape[0]) for p in pws]
    m = None if parts[0][2] is None else torch.cat([part[2] for part in parts])
    return _packed(qtype, (n, k), torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts]), m)


# PackedWeight → its int8 per-channel copy for the gemm kernel (the weight itself for "int8").
_gemm_weights: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def gemm_weight(pw: PackedWeight) -> PackedWeight:
    """The weight the W8A8 kernel multiplies by: int8 per output channel. "int8" weights are
    used as they are; other types are dequantized and requantized once (the copy is cached)."""
    if pw.qtype == "int8":
        return pw
    copy = _gemm_weights.get(pw)
    if copy is None:
        copy = _gemm_weights[pw] = quantize(dequantize(pw), "int8")
    return copy


def c_kernels_available() -> bool:
    """Whether quant_linear runs in C on this machine (compiler, AVX512-VNNI); without them every
    product dequantizes the whole weight, far slower than serving it as bf16."""
    return _IMPL != "torch" and quant_cpu.linear(torch.zeros(1, 32), quantize(torch.ones(1, 32), "int8"), None) is not None


def reference_linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The torch reference of quant_linear: dequantize, then an fp32 matmul."""
    y = F.linear(x.float(), dequantize(pw), None if bias is None else bias.float())
    return y.to(x.dtype)


def fake_quant_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """x as the C kernels see it: int8 per block of `block` along K (scale amax / 127, round half
    to even), dequantized back to fp32. reference_linear of this is what they compute exactly
    (up to fp32 summation order)."""
    x = x.float()
    m, k = x.shape
    g = F.pad(x, (0, (-k) % block)).view(m, -1, block)
    amax = g.abs().amax(-1, keepdim=True)
    c127 = torch.full_like(amax, 127.0)   # tensor / tensor: a true division, as in C (127.0 / t is 127 * (1 / t))
    inv = torch.where(amax > 0, c127 / amax, torch.zeros_like(amax))
    return (torch.round(g * inv) * (amax / c127)).view(m, -1)[:, :k]


def fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    """x as the gemm kernel sees it: int8 per token (one scale amax / 127 per row)."""
    return fake_quant_activations(x, max(32, -(-x.shape[1] // 32) * 32))


def _check_linear(x: torch.Tensor, pw: PackedWeight) -> None:
    if x.dim() != 2 or x.shape[1] != pw.shape[1]:
        raise ValueError(f"quant_linear: x {tuple(x.shape)} against a weight {pw.shape}")


def quant_linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None,
                 impl: str | None = None) -> torch.Tensor:
    """x [M, K] (bf16 or fp32) @ W^T (+ bias) → [M, N] in x.dtype.

    impl: "c" (the default C kernel: for bf16 x "gemm" from GEMM_MIN_ROWS rows up when set, else
    `C_KERNEL`; "f32" for fp32 x), "gemm" (W8A8: int8 activations per token against
    gemm_weight(pw), at any M), "vnni" (int8 activations per block, vpdpbusd), "bf16" (bf16 activations, vdpbf16ps; 4-bit codes only,
    8-bit ones take vnni), "f32" (fp32 FMAs), "torch" (the reference). A C kernel that does not apply falls back to the reference. None
    takes GATEWAY_QUANT_KERNELS as read at import (default "c")."""
    _check_linear(x, pw)
    impl = impl or _IMPL
    if impl not in IMPLS:
        raise ValueError(f"quant_linear: impl {impl!r} is not one of {', '.join(IMPLS)}")
    if impl != "torch":
        kernel = _default_kernel(x) if impl == "c" else impl
        if kernel == "gemm":
            out = quant_cpu.linear(x, gemm_weight(pw), bias, "gemm") if _gemm_runs() else None
            if out is not None:
                return out
            kernel = C_KERNEL   # no VNNI: the same fallbacks as the other kernels
        out = quant_cpu.linear(x, pw, bias, kernel)
        if out is None and kernel != "vnni":
            out = quant_cpu.linear(x, pw, bias, "vnni")
        if out is not None:
            return out
    return reference_linear(x, pw, bias)


def _gemm_runs() -> bool:
    """GEMM_KERNEL, probed at the first call (no int8 copy of a weight is made without it)."""
    return globals()["GEMM_KERNEL"] if "GEMM_KERNEL" in globals() else __getattr__("GEMM_KERNEL")


def _default_kernel(x: torch.Tensor) -> str:
    if x.dtype == torch.float32:
        return "f32"
    return "gemm" if GEMM_MIN_ROWS is not None and x.shape[0] >= GEMM_MIN_ROWS else C_KERNEL


def quant_embedding(ids: torch.Tensor, pw: PackedWeight, dtype: torch.dtype, impl: str | None = None) -> torch.Tensor:
    """Rows `ids` of a packed [vocab, hidden] table, dequantized into `dtype`: [T, hidden]."""
    ids = ids.reshape(-1).long()
    if (impl or _IMPL) == "c":
        out = quant_cpu.rows(ids, pw.qtype, pw.shape, pw.data, dtype)   # checks the ids itself
        if out is not None:
            return out
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= pw.shape[0]):
        raise IndexError(f"quant_embedding: ids outside [0, {pw.shape[0]})")
    return layout.rows_of(pw.qtype, pw.data, ids)[:, :pw.shape[1]].to(dtype)
