"""Kernel dispatch: one entry point per kernel. CUDA tensors go to Triton, CPU tensors to
the C kernels (cpu_ops, falling back to the torch reference where they do not apply);
`set_backend` (called once from the config) can force "torch" (the reference) or "triton",
so tests can run the Triton path on CPU under TRITON_INTERPRET=1.
Triton is imported lazily: the CPU path never pays for it."""

from __future__ import annotations

import torch

from gateway.kernels import reference
from gateway.kernels.metadata import AttentionMetadata

_backend = "auto"   # auto | torch | triton


def set_backend(name: str) -> None:
    global _backend
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown kernel backend {name!r}")
    _backend = name


def _impl(tensor: torch.Tensor):
    if _backend == "torch":
        return reference
    if _backend == "auto" and not tensor.is_cuda:
        from gateway.kernels import cpu_ops
        return cpu_ops if cpu_ops.available() else reference
    from gateway.kernels import triton_ops
    return triton_ops


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    _impl(key).store_kv(key, value, k_cache, v_cache, slot_mapping)


def paged_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float):
    return _impl(q).paged_attention(q, k_cache, v_cache, meta, scale)


def rms_norm(x, weight, eps: float):
    return _impl(x).rms_norm(x, weight, eps)


def fused_add_rms_norm(x, residual, weight, eps: float):
    return _impl(x).fused_add_rms_norm(x, residual, weight, eps)


def silu_and_mul(x):
    return _impl(x).silu_and_mul(x)


def rotary_embedding(positions, q, k, cos_sin_cache):
    return _impl(q).rotary_embedding(positions, q, k, cos_sin_cache)


__all__ = ["AttentionMetadata", "set_backend", "store_kv", "paged_attention", "rms_norm",
           "fused_add_rms_norm", "silu_and_mul", "rotary_embedding"]
