"""Reading a GGUF file's tensors directly (gguf.GGUFReader, memory-mapped), under Hugging Face
names, without transformers' dequantizing conversion.

Each tensor comes out as a lazy GGUFTensor: `narrow` slices its raw rows (or whole blocks of
columns) before anything is unpacked, so a tensor-parallel rank repacks only its own slice;
`load` returns a PackedWeight (kernels.quant.pack_gguf) for the types the kernels keep packed,
a float tensor for F32/F16/BF16 (norms), and a dequantized float tensor, with a log line naming
tensor and type, for every other quantized type.

llama.cpp's converter permutes the rows of attn_q / attn_k of "llama"-architecture files (Llama,
Mistral, SmolLM2, TinyLlama) so that rotary pairs adjacent elements; our rotary rotates halves,
as Hugging Face does. Every row of a GGUF matrix is quantized on its own, so undoing the
permutation is a gather of whole raw rows: exact, and done before packing (transformers'
LlamaTensorProcessor._reverse_permute_weights does the same on dequantized floats)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

try:
    from gateway.kernels import quant
except ImportError:   # no quantized kernels in this tree: every tensor is dequantized
    quant = None

log = logging.getLogger("gateway.loader")

_FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# GGUF tensor name (after "blk.N.") → Hugging Face name (after "model.layers.N.")
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
# Tensors that carry nothing our model reads: llama 3 rope frequency factors (the HF config's
# rope_scaling already gives them to arch.py) and precomputed rotary tables.
SKIPPED = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor; None for an unknown one."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{match.group(3)}"
    return None


def rotary_row_order(rows: int, heads: int) -> np.ndarray:
    """Hugging Face row r of a permuted q/k weight is GGUF row order[r] (per head: the
    interleaved pairs (i, 2) of llama.cpp back to two halves (2, i))."""
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(-1)


class GGUFTensor:
    """One GGUF tensor, not yet unpacked. `raw` is [N, row bytes] (uint8) for quantized types
    and [N, K] (or [K]) for float ones; `shape` is the logical (N, K) Hugging Face shape."""

    def __init__(self, name: str, type_name: str, raw: np.ndarray, shape: tuple[int, ...]):
        self.name, self.type_name, self.raw = name, type_name, raw
        self.shape = torch.Size(shape)

    @property
    def block(self) -> int:
        """Elements per quantization block along K (1 for float types)."""
        if self.type_name in _FLOAT_TYPES:
            return 1
        return quant_block(self.type_name)

    @property
    def packed(self) -> bool:
        return quant is not None and self.type_name.lower() in quant.GGUF_QTYPES

    def take_rows(self, order: np.ndarray) -> "GGUFTensor":
        return GGUFTensor(self.name, self.type_name, self.raw[order], tuple(self.shape))

    def narrow(self, dim: int, start: int, length: int):
        """Rows or columns [start, start + length): raw bytes where whole blocks allow it,
        otherwise the dequantized float slice (logged)."""
        shape = list(self.shape)
        shape[dim] = length
        if dim == 0:
            return GGUFTensor(self.name, self.type_name, self.raw[start:start + length], tuple(shape))
        block = self.block
        if start % block or length % block:
            log.info("%s (%s): columns [%d, %d) split a %d-element block; this slice is dequantized",
                     self.name, self.type_name, start, start + length, block)
            return self.dequantize().narrow(dim, start, length)
        bytes_per_block = self.raw.shape[1] // (self.shape[1] // block)
        cols = slice(start // block * bytes_per_block, (start + length) // block * bytes_per_block)
        return GGUFTensor(self.name, self.type_name, self.raw[:, cols], tuple(shape))

    def dequantize(self) -> torch.Tensor:
        if self.type_name in _FLOAT_TYPES:
            return torch.from_numpy(np.array(self.raw)).to(_FLOAT_TYPES[self.type_name]).reshape(self.shape)
        from gguf.quants import dequantize
        qtype = getattr(__import__("gguf").GGMLQuantizationType, self.type_name)
        return torch.from_numpy(dequantize(np.ascontiguousarray(self.raw), qtype)).reshape(self.shape)

    def load(self):
        """A PackedWeight for the types the kernels keep packed, else a float tensor."""
        if self.packed and len(self.shape) == 2:
            return quant.pack_gguf(self.type_name.lower(), np.ascontiguousarray(self.raw), tuple(self.shape))
        if self.type_name not in _FLOAT_TYPES:
            log.info("%s is %s, which is not kept packed: dequantized at load", self.name, self.type_name)
        return self.dequantize()


def quant_block(type_name: str) -> int:
    import gguf
    return gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, type_name)][0]


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def open_gguf(path: Path):
    import gguf
    return gguf.GGUFReader(str(path))


def iter_gguf(path: Path, progress: bool = True) -> Iterator[tuple[str, GGUFTensor]]:
    """Every tensor of the file as (Hugging Face name, GGUFTensor); q/k rows un-permuted."""
    reader = open_gguf(path)
    arch = _field(reader, "general.architecture", "llama")
    heads = _field(reader, f"{arch}.attention.head_count")
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv", heads)
    tensors = reader.tensors
    if progress:
        from tqdm import tqdm
        tensors = tqdm(tensors, desc="loading GGUF tensors", unit="tensor", leave=False)
    for t in tensors:
        name = hf_name(t.name)
        if name is None:
            if t.name in SKIPPED:
                continue
            raise ValueError(f"GGUF tensor {t.name!r} has no Hugging Face counterpart we know")
        shape = tuple(int(d) for d in reversed(t.shape))     # GGUF lists ne0 (K) first
        tensor = GGUFTensor(name, t.tensor_type.name, t.data, shape)
        if arch == "llama" and re.search(r"\.(q_proj|k_proj)\.", name):
            tensor = tensor.take_rows(rotary_row_order(shape[0], heads if "q_proj" in name else kv_heads))
        yield name, tensor


def gguf_tensor_info(path: Path) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """Hugging Face name → (shape, GGUF type, bytes in the file), read from the header only."""
    reader = open_gguf(path)
    info = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is not None:
            info[name] = (tuple(int(d) for d in reversed(t.shape)), t.tensor_type.name, int(t.n_bytes))
    return info
