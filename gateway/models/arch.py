"""ModelArch: the few numbers a model class needs, built from a Hugging Face config by a
per-model-type config builder (see registry.py). Rope scaling (Llama 3, linear, yarn, ...)
is resolved here once, through transformers' own rope functions, into inv_freq."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ModelArch:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    inv_freq: torch.Tensor            # [head_dim // 2] float32
    attention_scaling: float = 1.0
    sliding_window: int | None = None


def rope_inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if not params:  # transformers 4.x style configs
        params = dict(getattr(hf_config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        base = params.get("rope_theta", 10000.0)
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope type {rope_type!r}")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
    return inv_freq.float(), float(scaling)


def llama_arch(hf_config, architecture: str) -> ModelArch:
    """Config builder for llama / mistral / qwen2 style configs."""
    c = hf_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    inv_freq, scaling = rope_inv_freq(c, head_dim)
    model_type = getattr(c, "model_type", "llama")
    return ModelArch(
        architecture=architecture, model_type=model_type, vocab_size=c.vocab_size,
        hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
        head_dim=head_dim, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(getattr(c, "attention_bias", False)),
        inv_freq=inv_freq, attention_scaling=scaling,
        sliding_window=getattr(c, "sliding_window", None) if getattr(c, "use_sliding_window", True) else None)
