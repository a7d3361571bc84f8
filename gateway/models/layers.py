"""Building blocks for decoder models: linears with merged-weight loaders, RMSNorm, rotary
embedding, and paged attention. Heavy math goes through gateway.kernels' dispatch, so the
same modules run the torch path on CPU and Triton on CUDA.

A parameter that is filled from several checkpoint tensors (merged q|k|v, gate|up) carries
`shard_offsets`; `load_shard` copies one checkpoint tensor into its slice."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gateway import kernels
from gateway.kernels.metadata import AttentionMetadata


class Linear(nn.Module):
    """y = x W^T (+ b). `shard_sizes` names the row blocks of a merged weight, in order."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 shard_sizes: dict[str, int] | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in (shard_sizes or {}).items():
            self.shard_offsets[name] = (start, size)
            start += size
        if shard_sizes:
            assert start == out_features, "shard sizes must add up to out_features"
        self._packed = None

    def load_shard(self, param_name: str, shard: str | None, tensor: torch.Tensor) -> None:
        param = getattr(self, param_name)
        target = param.data if shard is None else param.data.narrow(0, *self.shard_offsets[shard])
        if target.shape != tensor.shape:
            raise ValueError(f"shape mismatch for {param_name}[{shard}]: model {tuple(target.shape)}, "
                             f"checkpoint {tuple(tensor.shape)}")
        target.copy_(tensor)

    def prepack(self) -> None:
        """CPU bf16: reorder the weight once into oneDNN's blocked layout (AMX-friendly)."""
        if self.weight.device.type == "cpu" and self.weight.dtype == torch.bfloat16:
            try:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.data, None)
            except (RuntimeError, AttributeError):
                self._packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps), x
        return kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)


class PagedAttention(nn.Module):
    """Rotary → store the new K/V into the paged cache → attend over the cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, cos_sin_cache: torch.Tensor):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.cos_sin_cache = cos_sin_cache   # shared across layers, not a parameter

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: AttentionMetadata, kv_cache: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens = q.shape[0]
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        kernels.rotary_embedding(positions, q, k, self.cos_sin_cache)
        k_cache, v_cache = kv_cache
        kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = kernels.paged_attention(q, k_cache, v_cache, meta, self.scale)
        return out.reshape(tokens, self.num_heads * self.head_dim)
