"""Loading a built model's weights under a `--quantization` mode, and what they weigh by type.

Order: pick the tensor source (`auto` on a GGUF file reads the file itself, keeping the types
kernels.quant packs; everything else reads the Hugging Face directory, for a GGUF the
dequantized conversion) → model.load_weights → `int8` / `int4`: quantize the linears of the
float checkpoint → log the resident weight bytes by type.

The CUDA (Triton) path has no quantized kernels: there `auto` serves a GGUF dequantized, as
`none` does, and `int8` / `int4` are start-up errors."""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from gateway.models.gguf_weights import iter_gguf
from gateway.models.layers import Embedding, Linear, is_packed, quant
from gateway.models.loader import ModelSource, iter_checkpoint, iter_weights

log = logging.getLogger("gateway.loader")

QUANTIZATION_MODES = ("auto", "none", "int8", "int4")
_DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def load_model_weights(model: nn.Module, source: ModelSource, dtype: torch.dtype, device: torch.device,
                       quantization: str = "auto", lazy: bool = False, progress: bool = True) -> dict[str, int]:
    """Fill `model` from `source`; returns the weight bytes by type (also logged).
    lazy: tensor-parallel ranks read only their slices (a GGUF file is always read lazily)."""
    if quantization not in QUANTIZATION_MODES:
        raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATION_MODES)}, not {quantization!r}")
    if quantization in ("int8", "int4") and device.type != "cpu":
        raise ValueError(f"--quantization {quantization} runs on the CPU only (the CUDA path has no "
                         f"quantized kernels); use --quantization none on {device.type}")
    packed_gguf = source.gguf_file is not None and quantization == "auto"
    if quant is None and (packed_gguf or quantization in ("int8", "int4")):
        if quantization != "auto":
            raise ValueError(f"--quantization {quantization}: gateway.kernels.quant is not in this build")
        log.info("%s: no quantized kernels in this build (gateway.kernels.quant); weights dequantized",
                 source.gguf_file.name)
        packed_gguf = False
    if packed_gguf and not quant.NATIVE_KERNELS:
        log.info("%s: the quantized kernels run through the torch reference in this build; "
                 "weights dequantized", source.gguf_file.name)
        packed_gguf = False
    if packed_gguf and device.type != "cpu":
        log.info("%s: the %s path keeps GGUF weights dequantized", source.gguf_file.name, device.type)
        packed_gguf = False
    if packed_gguf:
        weights = iter_gguf(source.gguf_file, progress=progress)
    else:
        weights = (iter_checkpoint if lazy else iter_weights)(source.directory, dtype, progress=progress)
    model.load_weights(weights)
    if quantization in ("int8", "int4"):
        if not hasattr(model, "quantize"):
            raise ValueError(f"{type(model).__name__} cannot be quantized (it has no quantize()); "
                             f"use --quantization none")
        model.quantize(quantization)
    sizes = weight_bytes_by_type(model)
    log.info("weights (%s): %s", quantization, format_sizes(sizes))
    return sizes


def weight_bytes_by_type(model: nn.Module) -> dict[str, int]:
    """Bytes the model's weights hold, by storage type (q4_1, q8_0, bf16, f32, ...); a table
    shared by a tied embedding and LM head counts once."""
    totals: Counter[str] = Counter()
    seen: set[int] = set()
    for module in model.modules():
        held = list(module.parts or []) if isinstance(module, Linear) else []
        if isinstance(module, Embedding) and module.packed is not None:
            held.append(module.packed)
        for part in held:
            if id(part) in seen:
                continue
            seen.add(id(part))
            if is_packed(part):
                totals[part.qtype] += part.nbytes()
            else:
                totals[_DTYPE_NAMES.get(part.dtype, str(part.dtype))] += part.numel() * part.element_size()
    for param in model.parameters():   # each shared parameter once
        totals[_DTYPE_NAMES.get(param.dtype, str(param.dtype))] += param.numel() * param.element_size()
    return {name: size for name, size in totals.most_common() if size}


def format_sizes(sizes: dict[str, int]) -> str:
    total = sum(sizes.values())
    parts = ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in sizes.items())
    return f"{total / 2**20:.1f} MiB ({parts})"
