"""Triton RMSNorm, plain and fused with the residual add. One program per row; the row is
loaded whole (hidden sizes up to 16k fit one block).

Side effects: writes the caller-provided outputs only (normed rows, and for the fused form
the summed residual stream, written before its normalisation is computed). Inputs are read,
never modified, matching gateway.kernels.reference.

Rounding follows the reference (and HF Llama): the residual sum is rounded to its storage
dtype before it is normalised, and the normalised row is rounded to the input dtype before
the weight multiply."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gateway.kernels.triton_attention import TL_DTYPES


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, stride_x, stride_r, stride_o,
                     stride_s, n_cols, eps, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                     ROUND_DTYPE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x = x + tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(ROUND_DTYPE).to(tl.float32)
        tl.store(sum_ptr + row * stride_s + cols, x, mask=mask)
    rstd = tl.math.rsqrt(tl.sum(x * x, 0) / n_cols + eps)
    normed = (x * rstd).to(ROUND_DTYPE).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, normed * w, mask=mask)


def norm_config(hidden: int, dtype: torch.dtype, has_residual: bool) -> tuple[dict, dict]:
    """(constexprs, launch options): more warps for wider rows so each thread holds ~8-16 values."""
    block = triton.next_power_of_2(hidden)
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    return dict(BLOCK=block, HAS_RESIDUAL=has_residual, ROUND_DTYPE=TL_DTYPES[dtype]), dict(num_warps=warps)


def _rows(t: torch.Tensor) -> torch.Tensor:
    rows = t.reshape(-1, t.shape[-1])
    assert rows.stride(-1) == 1, "rows must be contiguous in the hidden dimension"
    return rows


def launch_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (normed, summed or None). Output dtypes follow the reference's promotion."""
    hidden = x.shape[-1]
    assert weight.shape == (hidden,) and weight.is_contiguous()
    fused = residual is not None
    summed_dtype = torch.promote_types(x.dtype, residual.dtype) if fused else x.dtype
    out_dtype = torch.promote_types(summed_dtype, weight.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    summed = torch.empty(x.shape, dtype=summed_dtype, device=x.device) if fused else None
    xs, outs = _rows(x), out.view(-1, hidden)
    rs = _rows(residual) if fused else xs               # unread placeholders when not fused
    sums = summed.view(-1, hidden) if fused else outs
    if xs.shape[0] == 0:
        return out, summed
    consts, opts = norm_config(hidden, summed_dtype, fused)
    _rms_norm_kernel[(xs.shape[0],)](xs, rs, weight, outs, sums, xs.stride(0), rs.stride(0),
                                     outs.stride(0), sums.stride(0), hidden, eps, **consts, **opts)
    return out, summed
