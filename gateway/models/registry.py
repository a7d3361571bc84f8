"""Model registry: `architectures` name → model class, and model_type → config builder.
Users add their own with `register_model` from a Python file passed as --model-module."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from gateway.models.arch import ModelArch, llama_arch
from gateway.models.llama import LlamaForCausalLM

ConfigBuilder = Callable[[object, str], ModelArch]

_MODEL_CLASSES: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}
_CONFIG_BUILDERS: dict[str, ConfigBuilder] = {"llama": llama_arch, "mistral": llama_arch, "qwen2": llama_arch}


def register_model(architecture: str, model_class: type, model_type: str | None = None,
                   config_builder: ConfigBuilder | None = None) -> None:
    """Make `architecture` loadable. The class is built as model_class(arch: ModelArch) and must
    provide forward(input_ids, positions, meta, kv_caches), compute_logits, load_weights."""
    _MODEL_CLASSES[architecture] = model_class
    if model_type is not None:
        _CONFIG_BUILDERS[model_type] = config_builder or llama_arch


def load_model_module(path: str) -> None:
    """Execute a user file; it is expected to call gateway.models.registry.register_model."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--model-module {path}: no such file")
    spec = importlib.util.spec_from_file_location(f"gateway_user_models_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


def supported_architectures() -> list[str]:
    return sorted(_MODEL_CLASSES)


def resolve(hf_config) -> tuple[type, ModelArch]:
    """HF config → (model class, ModelArch); a clear error for anything unsupported."""
    architectures = list(getattr(hf_config, "architectures", None) or [])
    model_type = getattr(hf_config, "model_type", None)
    if not architectures and model_type in ("llama", "mistral", "qwen2"):
        architectures = [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                          "qwen2": "Qwen2ForCausalLM"}[model_type]]
    for name in architectures:
        if name in _MODEL_CLASSES:
            builder = _CONFIG_BUILDERS.get(model_type)
            if builder is None:
                raise ValueError(f"model type {model_type!r} has no config builder; "
                                 f"register one with register_model(..., model_type=...)")
            return _MODEL_CLASSES[name], builder(hf_config, name)
    raise ValueError(f"unsupported architecture {architectures or model_type!r}; supported: "
                     f"{', '.join(supported_architectures())} (add one with --model-module)")
