"""Triton backend of gateway.kernels: one function per kernel, with exactly the signatures and
return values of gateway.kernels.reference (the dispatch swaps the two modules).

Importing this module imports triton and decorates every kernel; whether they run compiled or
interpreted is fixed at that moment by TRITON_INTERPRET. Each entry point checks shapes and
strides, allocates its outputs, then launches; paged_attention launches the decode kernels
(split + reduce) before the prefill kernel. No entry point synchronises with the device."""

from __future__ import annotations

import torch

from gateway.kernels.metadata import AttentionMetadata
from gateway.kernels.triton_attention import decode_attention, prefill_attention
from gateway.kernels.triton_elementwise import launch_rotary, launch_silu_and_mul, launch_store_kv
from gateway.kernels.triton_norm import launch_rms_norm

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [T, KVH, D] into the paged caches at slot_mapping [T]; -1 slots are skipped."""
    launch_store_kv(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, D] for the flat batch (decodes first) → [T, H, D] in q's dtype."""
    assert q.dtype in SUPPORTED_DTYPES and k_cache.dtype == q.dtype == v_cache.dtype
    assert q.dim() == 3 and q.stride(-1) == 1 and q.shape[2] == k_cache.shape[3]
    assert q.shape[1] % k_cache.shape[2] == 0, "num_heads must be a multiple of num_kv_heads"
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if meta.num_decodes:
        decode_attention(q, k_cache, v_cache, out, meta, scale)
    if meta.num_seqs > meta.num_decodes:
        prefill_attention(q, k_cache, v_cache, out, meta, scale)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return launch_rms_norm(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); x and residual are left untouched."""
    assert x.shape == residual.shape
    return launch_rms_norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] = [gate | up] → silu(gate) * up, [T, I]."""
    return launch_silu_and_mul(x)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary, in place. q [T, H, D], k [T, KVH, D]; cos_sin_cache [max_pos, D] = [cos | sin]."""
    launch_rotary(positions, q, k, cos_sin_cache)
    return q, k
