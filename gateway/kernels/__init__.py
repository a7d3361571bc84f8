"""Kernel dispatch: one entry point per kernel. CUDA tensors go to Triton, CPU tensors to
the C kernels (cpu_ops, falling back to the torch reference where they do not apply);
`set_backend` (called once from the config) can force "torch" (the reference) or "triton",
so tests can run the Triton path on CPU under TRITON_INTERPRET=1. The choice per device
kind is made at the first kernel call and kept.
Triton is imported lazily: the CPU path never pays for it."""

from __future__ import annotations

from types import ModuleType

import torch

from gateway.kernels import reference
from gateway.kernels.metadata import AttentionMetadata

_backend = "auto"   # auto | torch | triton
# is_cuda → the module that runs kernels on such tensors, resolved at first use: every kernel
# call dispatches here (about 6 per layer per step), so the import and the C library check
# run once, not per call. set_backend clears it.
_resolved: dict[bool, ModuleType] = {}


def set_backend(name: str) -> None:
    global _backend
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown kernel backend {name!r}")
    _backend = name
    _resolved.clear()


def _impl(tensor: torch.Tensor) -> ModuleType:
    on_cuda = tensor.is_cuda
    impl = _resolved.get(on_cuda)
    if impl is None:
        impl = _resolved[on_cuda] = _resolve(on_cuda)
    return impl


def _resolve(on_cuda: bool) -> ModuleType:
    if _backend == "torch":
        return reference
    if _backend == "auto" and not on_cuda:
        from gateway.kernels import cpu_ops
        return cpu_ops if cpu_ops.available() else reference   # no compiler: the torch reference
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
