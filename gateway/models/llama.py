"""Llama-family decoder (Llama 2/3.x, SmolLM2, TinyLlama, Mistral, Qwen2 with qkv bias).

Weights use merged projections (q|k|v and gate|up) so each layer runs four matrix
products; `load_weights` maps Hugging Face tensor names onto them. Built with a
ParallelContext, the model is one tensor-parallel rank's shard (tp_layers.py): column-
parallel qkv / gate_up, row-parallel o_proj / down_proj, vocab-parallel embedding and LM
head, whose logits `compute_logits` gathers on rank 0 (None elsewhere). Built with a
LayerStage, it is one pipeline stage: only its layers (the embedding on the first stage, the
norm and LM head on the last; a tied head then loads the embedding's tensor itself); forward
takes the previous stage's [2, T, H] (hidden, residual) and returns the same for the next
stage, the normed hidden on the last. Tensors of other stages are skipped unread."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from gateway import kernels
from gateway.kernels.metadata import AttentionMetadata
from gateway.kernels.reference import build_cos_sin_cache
from gateway.models.arch import ModelArch
from gateway.models.layers import Linear, PagedAttention, RMSNorm
from gateway.models.loader import materialize
from gateway.models.partition import LayerStage
from gateway.models.tp_layers import (ParallelContext, ShardPlan, column_linear, row_linear, shard_plan,
                                      vocab_embedding)

# HF checkpoint projection name → (our merged module, shard)
_MERGED = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
           "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up")}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(weight|bias)$")
_LAYER_INDEX_RE = re.compile(r"^model\.layers\.(\d+)\.")


RESCORED_CANDIDATES = 16


def rescore_top_logits(logits: torch.Tensor, hidden: torch.Tensor, head: Linear) -> None:
    """16-bit logits come out quantized (steps of 0.125 near 20), which makes near-ties at the
    top arbitrary and greedy output depend on batch shape. Recompute the top candidates of
    each row exactly in fp32, in place: a [B, 16] product instead of a full fp32 LM head
    (a quantized head: its rows dequantized exactly, the product in fp32)."""
    top = logits.topk(min(RESCORED_CANDIDATES, logits.shape[-1]), dim=-1).indices                # [B, k]
    exact = torch.bmm(head.weight_rows(top, torch.float32), hidden.float().unsqueeze(-1)).squeeze(-1)
    logits.scatter_(1, top, exact)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, cos_sin_cache: torch.Tensor, plan: ShardPlan,
                 parallel: ParallelContext | None = None):
        super().__init__()
        heads, d = plan.attention, arch.head_dim      # this rank's heads (all of them at tp=1)
        q_size, kv_size = heads.num_heads * d, heads.num_kv_heads * d
        self.q_size, self.kv_size = q_size, kv_size
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        q, kv = (heads.q_start * d, q_size), (heads.kv_start * d, kv_size)
        self.qkv_proj = column_linear(arch.hidden_size, {"q": q, "k": kv, "v": kv}, arch.qkv_bias, parallel)
        self.o_proj = row_linear(q, arch.hidden_size, False, parallel)
        self.gate_up_proj = column_linear(arch.hidden_size, {"gate": plan.mlp, "up": plan.mlp}, False, parallel)
        self.down_proj = row_linear(plan.mlp, arch.hidden_size, False, parallel)
        self.attn = PagedAttention(heads.num_heads, heads.num_kv_heads, d, cos_sin_cache)

    def forward(self, positions, hidden, residual, meta, kv_cache):
        hidden, residual = self.input_layernorm(hidden, residual)
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        hidden = self.o_proj(self.attn(positions, q, k, v, meta, kv_cache))
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        hidden = self.down_proj(kernels.silu_and_mul(self.gate_up_proj(hidden)))
        return hidden, residual


class LlamaForCausalLM(nn.Module):
    supports_tensor_parallel = True
    supports_pipeline_parallel = True

    def __init__(self, arch: ModelArch, parallel: ParallelContext | None = None, stage: LayerStage | None = None):
        super().__init__()
        self.arch, self.parallel = arch, parallel
        self.stage = stage or LayerStage(0, arch.num_layers, True, True)
        plan = shard_plan(arch, parallel.rank, parallel.world_size) if parallel else shard_plan(arch)
        cos_sin = build_cos_sin_cache(arch.head_dim, arch.max_position_embeddings, arch.inv_freq,
                                      arch.attention_scaling)
        self.register_buffer("cos_sin_cache", cos_sin, persistent=False)
        self.embed_tokens = vocab_embedding(plan.vocab, arch.hidden_size, parallel) if self.stage.is_first else None
        self.layers = nn.ModuleList(LlamaDecoderLayer(arch, self.cos_sin_cache, plan, parallel)
                                    for _ in range(self.stage.count))
        self.norm = self.lm_head = None
        if self.stage.is_last:
            self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
            self.lm_head = column_linear(arch.hidden_size, {None: plan.vocab}, False, parallel)
        if arch.tie_word_embeddings and self.stage.is_first and self.stage.is_last:
            self.lm_head.weight = self.embed_tokens.weight

    def _apply(self, fn, *args, **kwargs):
        # .to(dtype/device) must keep the rotary table float32 and shared by every layer.
        super()._apply(fn, *args, **kwargs)
        self.cos_sin_cache = self.cos_sin_cache.float()
        for layer in self.layers:
            layer.attn.cos_sin_cache = self.cos_sin_cache
        return self

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                intermediate: torch.Tensor | None = None) -> torch.Tensor:
        """intermediate: the previous pipeline stage's [2, T, H] (hidden, residual)."""
        if intermediate is None:
            hidden, residual = self.embed_tokens(input_ids), None
        else:
            hidden, residual = intermediate[0], intermediate[1]
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, meta, kv_cache)
        if self.norm is None:   # not the last stage: the next one continues from both
            return torch.stack((hidden, residual))
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.lm_head(hidden).float()
        if hidden.dtype != torch.float32:   # each rank rescores its own top: the global top is among them
            rescore_top_logits(logits, hidden, self.lm_head)
        return logits if self.parallel is None else self.parallel.comm.gather(logits)

    def prepack(self) -> None:
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepack()

    def quantize(self, qtype: str) -> None:
        """`--quantization int8|int4` on a float checkpoint: every linear of the decoder layers
        (and an untied LM head); the embedding, and a head tied to it, stay in float."""
        heads = [] if self.arch.tie_word_embeddings or self.lm_head is None else [self.lm_head]
        for module in [*self.layers.modules(), *heads]:
            if isinstance(module, Linear):
                module.quantize(qtype)

    # ---- weights -------------------------------------------------------------------------
    def checkpoint_names(self) -> dict[str, tuple[int, ...]]:
        """Every HF tensor name this model expects, with its shape (for check-model)."""
        names = {}
        for name, _ in self._targets():
            module, attr, shard = self._resolve(name)
            param = getattr(module, attr)
            shape = tuple(param.shape) if shard is None else (module.shard_offsets[shard][1], *param.shape[1:])
            names[name] = shape
        return names

    def _targets(self):
        a, stage = self.arch, self.stage
        if stage.is_first or (stage.is_last and a.tie_word_embeddings):   # a tied head reads it too
            yield "model.embed_tokens.weight", None
        for i in range(stage.start, stage.end):
            p = f"model.layers.{i}"
            projections = [("self_attn", n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
            projections += [("mlp", n) for n in ("gate_proj", "up_proj", "down_proj")]
            for block, proj in projections:
                yield f"{p}.{block}.{proj}.weight", None
                if a.qkv_bias and proj in ("q_proj", "k_proj", "v_proj"):
                    yield f"{p}.{block}.{proj}.bias", None
            yield f"{p}.input_layernorm.weight", None
            yield f"{p}.post_attention_layernorm.weight", None
        if stage.is_last:
            yield "model.norm.weight", None
            if not a.tie_word_embeddings:
                yield "lm_head.weight", None

    def _elsewhere(self, name: str) -> bool:
        """A tensor another pipeline stage loads."""
        match = _LAYER_INDEX_RE.match(name)
        if match:
            return not self.stage.start <= int(match.group(1)) < self.stage.end
        return name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")

    def _resolve(self, name: str) -> tuple[nn.Module, str, str | None]:
        """HF tensor name → (our module, parameter attribute, shard or None)."""
        if name == "model.embed_tokens.weight" and self.embed_tokens is None:
            return self.lm_head, "weight", None           # a later stage's tied head
        match = _LAYER_RE.match(name)
        if match:
            layer = self.layers[int(match.group(1)) - self.stage.start]
            proj, attr = match.group(3), match.group(4)
            if proj in _MERGED:
                merged, shard = _MERGED[proj]
                return getattr(layer, merged), attr, shard
            return getattr(layer, proj), attr, None
        match = _LAYER_INDEX_RE.match(name)
        if match:   # the layer norms: this stage's own index
            module_path, attr = name[match.end():].rsplit(".", 1)
            return self.layers[int(match.group(1)) - self.stage.start].get_submodule(module_path), attr, None
        short = name.removeprefix("model.")
        module_path, attr = short.rsplit(".", 1)
        return self.get_submodule(module_path), attr, None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors in; returns the names loaded. Unknown names raise."""
        expected = dict(self._targets())
        loaded = set()
        for name, tensor in weights:
            if name not in expected:
                if name == "lm_head.weight" and self.arch.tie_word_embeddings:
                    continue   # some tied checkpoints still carry a copy
                if "rotary_emb.inv_freq" in name or self._elsewhere(name):
                    continue
                raise ValueError(f"unexpected weight {name!r} for {self.arch.architecture}")
            module, attr, shard = self._resolve(name)
            if hasattr(module, "load_shard"):   # linears and the vocab-parallel embedding slice it
                module.load_shard(attr, shard, tensor)
            else:
                tensor = materialize(tensor)
                param = getattr(module, attr)
                if param.shape != tensor.shape:
                    raise ValueError(f"shape mismatch for {name}: model {tuple(param.shape)}, "
                                     f"checkpoint {tuple(tensor.shape)}")
                param.data.copy_(tensor)
            loaded.add(name)
        if (self.arch.tie_word_embeddings and self.stage.is_first and self.stage.is_last
                and self.embed_tokens.packed is not None):
            self.lm_head.set_parts([self.embed_tokens.packed])   # the head reads the packed table too
            self.lm_head.weight = self.embed_tokens.weight
        missing = sorted(set(expected) - loaded)
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ValueError(f"checkpoint is missing weights: {', '.join(missing[:5])}{more}")
        return loaded
