"""Building blocks for decoder models: linears with merged-weight loaders, RMSNorm, rotary
embedding, and paged attention. Heavy math goes through gateway.kernels' dispatch, so the
same modules run the torch path on CPU and Triton on CUDA.

A parameter that is filled from several checkpoint tensors (merged q|k|v, gate|up) carries
`shard_offsets`; `load_shard` copies one checkpoint tensor into its slice.

Quantized weights (kernels.quant.PackedWeight, from a GGUF file or `--quantization int8|int4`)
replace the float parameter: once every shard of a Linear has arrived, runs of shards with one
qtype are merged with concat_rows into `parts`, the float weight is dropped (a 0-element
placeholder keeps its dtype) and forward goes through quant_linear. A merged weight whose
shards differ in type (Q4_K_M files store some v / down rows as Q6_K) keeps one part per run
and concatenates the products."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gateway import kernels
from gateway.kernels.metadata import AttentionMetadata
from gateway.models.loader import materialize

try:
    from gateway.kernels import quant
except ImportError:   # no quantized kernels in this tree: every weight stays float
    quant = None

Part = "quant.PackedWeight | torch.Tensor"   # one run of output rows: packed, or float (mixed types)


def is_packed(value) -> bool:
    return quant is not None and isinstance(value, quant.PackedWeight)


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
        self.parts: list[Part] | None = None          # set when the weight is quantized
        self._arrived: dict = {}   # shard → its PackedWeight, or None once copied as float

    def load_shard(self, param_name: str, shard: str | None, tensor) -> None:
        tensor = materialize(tensor)
        param = getattr(self, param_name)
        target_shape = param.shape if shard is None else (self.shard_offsets[shard][1], *param.shape[1:])
        if is_packed(tensor) and param_name == "weight":
            if tuple(tensor.shape) != tuple(target_shape):
                raise ValueError(f"shape mismatch for weight[{shard}]: model {tuple(target_shape)}, "
                                 f"checkpoint {tuple(tensor.shape)}")
            self._arrived[shard] = tensor
        else:
            target = param.data if shard is None else param.data.narrow(0, *self.shard_offsets[shard])
            if target.shape != tensor.shape:
                raise ValueError(f"shape mismatch for {param_name}[{shard}]: model {tuple(target.shape)}, "
                                 f"checkpoint {tuple(tensor.shape)}")
            target.copy_(tensor)
            if param_name == "weight":
                self._arrived[shard] = None
        if param_name == "weight" and len(self._arrived) == max(1, len(self.shard_offsets)):
            if any(part is not None for part in self._arrived.values()):
                self._merge_packed()
            self._arrived = {}

    def _merge_packed(self) -> None:
        """All shards are in, some packed: consecutive shards of one kind become one part."""
        runs: list[list[Part]] = []
        for shard in self.shard_offsets or [None]:
            part = self._arrived[shard]
            if part is None:   # a float shard beside packed ones: keep its rows, free the rest
                part = (self.weight.data if shard is None else
                        self.weight.data.narrow(0, *self.shard_offsets[shard])).clone()
            if runs and _same_kind(runs[-1][-1], part):
                runs[-1].append(part)
            else:
                runs.append([part])
        self.set_parts([quant.concat_rows(run) if is_packed(run[0]) else torch.cat(run)
                        for run in runs])

    def set_parts(self, parts: list[Part]) -> None:
        """Serve from these quantized parts; the float weight is released."""
        self.parts = list(parts)
        self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype, device=self.weight.device),
                                   requires_grad=False)
        self._packed = None

    def quantize(self, qtype: str) -> None:
        """`--quantization int8|int4`: quantize the loaded float weight (per output channel / groups)."""
        self.set_parts([quant.quantize(self.weight.data, qtype)])

    def weight_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the (logical) weight, in dtype: the LM head's rescoring reads these."""
        if self.parts is None:
            return self.weight[ids].to(dtype)
        if len(self.parts) != 1 or not is_packed(self.parts[0]):
            raise NotImplementedError("row lookup of a weight with several quantized parts")
        return quant.quant_embedding(ids.reshape(-1), self.parts[0], dtype).view(*ids.shape, -1)

    def prepack(self) -> None:
        """CPU bf16: reorder the weight once into oneDNN's blocked layout (AMX-friendly); a
        quantized one gets its int8 per-channel copy for batched steps (quant.gemm_weight) now,
        when W8A8 is on, rather than at the first prefill."""
        if self.parts is not None:
            if self.weight.dtype == torch.bfloat16 and quant.GEMM_MIN_ROWS is not None and quant.GEMM_KERNEL:
                for part in self.parts:
                    if is_packed(part):
                        quant.gemm_weight(part)
            return
        if self.weight.device.type == "cpu" and self.weight.dtype == torch.bfloat16:
            try:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.data, None)
            except (RuntimeError, AttributeError):
                self._packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parts is not None:
            return _quantized_linear(x, self.parts, self.bias)
        if self._packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _same_kind(a: Part, b: Part) -> bool:
    packed_a, packed_b = is_packed(a), is_packed(b)
    return packed_a == packed_b and (not packed_a or a.qtype == b.qtype)


def _quantized_linear(x: torch.Tensor, parts: list[Part], bias: torch.Tensor | None) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    if len(parts) == 1:
        out = quant.quant_linear(flat, parts[0], bias)
    else:
        out = torch.cat([quant.quant_linear(flat, p) if is_packed(p) else F.linear(flat, p)
                         for p in parts], dim=-1)
        out = out if bias is None else out + bias
    return out.view(*x.shape[:-1], out.shape[-1])


class Embedding(nn.Module):
    """Token embedding: a float table, or a packed one (GGUF Q8_0) read through quant_embedding."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)
        self.packed = None   # a kernels.quant.PackedWeight table

    def load_shard(self, param_name: str, shard: str | None, tensor) -> None:
        tensor = materialize(tensor)
        if tuple(tensor.shape) != tuple(self.weight.shape):
            raise ValueError(f"shape mismatch for the embedding: model {tuple(self.weight.shape)}, "
                             f"checkpoint {tuple(tensor.shape)}")
        if is_packed(tensor):
            self.packed = tensor
            self.weight = nn.Parameter(torch.empty(0, dtype=self.weight.dtype, device=self.weight.device),
                                       requires_grad=False)
        else:
            self.weight.data.copy_(tensor)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return quant.quant_embedding(ids.reshape(-1), self.packed, self.weight.dtype).view(*ids.shape, -1)
        return F.embedding(ids, self.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lookup(input_ids)


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
