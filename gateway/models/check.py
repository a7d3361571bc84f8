"""`gateway check-model PATH [--model-module F]`: does a checkpoint fit its model class?

Order: load the user's model module (if any) → resolve the path (a GGUF file is converted
once into the cache, like `serve` does, for its config) → read config.json → resolve the
class through the registry → build the model on torch's "meta" device (shapes only, nothing
allocated) and ask it for the tensor names and shapes it expects → read the checkpoint's
names, shapes and storage types from the headers (a GGUF file's own, which `serve` reads with
the default `--quantization auto`; else the safetensors'; no tensor data is read) → print a
report: missing, unexpected and shape-mismatched tensors, the count of matching ones, and
the weight bytes by storage type. Returns 0 when everything matches, 1 otherwise (the CLI
maps config/path errors to 2)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gateway.config import Config
from gateway.models import registry
from gateway.models.gguf_weights import gguf_tensor_info
from gateway.models.loader import load_hf_config, resolve_source, weight_files

# Checkpoint tensors every loader skips (see LlamaForCausalLM.load_weights).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class CheckReport:
    ok: list[str] = field(default_factory=list)
    missing: list[tuple[str, tuple]] = field(default_factory=list)      # expected, not in the checkpoint
    unexpected: list[tuple[str, tuple]] = field(default_factory=list)   # in the checkpoint, not expected
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)   # name, expected, found
    ignored: list[str] = field(default_factory=list)
    bytes_by_type: dict[str, int] = field(default_factory=dict)        # storage type → bytes in the file

    @property
    def passed(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def lines(self) -> list[str]:
        out = [f"missing: {name} (expected shape {_shape(expected)})" for name, expected in self.missing]
        out += [f"unexpected: {name} (shape {_shape(found)})" for name, found in self.unexpected]
        out += [f"shape mismatch: {name}: model expects {_shape(expected)}, checkpoint has {_shape(found)}"
                for name, expected, found in self.mismatched]
        out += [f"ignored: {name}" for name in self.ignored]
        out.append(f"OK: {len(self.ok)} tensors match; {len(self.missing)} missing, {len(self.unexpected)} "
                   f"unexpected, {len(self.mismatched)} shape mismatches")
        if self.bytes_by_type:
            sizes = ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in self.bytes_by_type.items())
            out.append(f"weights by type: {sum(self.bytes_by_type.values()) / 2**20:.1f} MiB ({sizes})")
        return out


def _shape(shape) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def expected_shapes(model_class, arch) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape the model class expects, without allocating any weight."""
    if isinstance(getattr(arch, "inv_freq", None), torch.Tensor):   # factory calls land on meta; keep it there too
        arch = dataclasses.replace(arch, inv_freq=arch.inv_freq.to("meta"))
    with torch.device("meta"):
        model = model_class(arch)
    if not hasattr(model, "checkpoint_names"):
        raise ValueError(f"{model_class.__name__} has no checkpoint_names(); it cannot be checked")
    return dict(model.checkpoint_names())


def compare(expected: dict[str, tuple], found: dict[str, tuple], tied_embeddings: bool = False) -> CheckReport:
    report = CheckReport()
    for name, shape in sorted(found.items()):
        if name not in expected:
            if name.endswith(_IGNORED_SUFFIXES) or (tied_embeddings and name == "lm_head.weight"):
                report.ignored.append(name)
            else:
                report.unexpected.append((name, shape))
        elif tuple(shape) != tuple(expected[name]):
            report.mismatched.append((name, tuple(expected[name]), tuple(shape)))
        else:
            report.ok.append(name)
    report.missing = [(name, shape) for name, shape in sorted(expected.items()) if name not in found]
    return report


def check_model(path: str, model_module: str | None = None, cache_dir: str | None = None) -> CheckReport:
    if model_module:
        registry.load_model_module(model_module)
    source = resolve_source(path, Path(cache_dir or Config().cache_dir).expanduser())
    model_class, arch = registry.resolve(load_hf_config(source))
    found = _gguf_header(source.gguf_file) if source.gguf_file else _safetensors_header(source.directory)
    report = compare(expected_shapes(model_class, arch), {name: shape for name, (shape, _, _) in found.items()},
                     arch.tie_word_embeddings)
    for _, kind, size in found.values():
        report.bytes_by_type[kind] = report.bytes_by_type.get(kind, 0) + size
    report.bytes_by_type = dict(sorted(report.bytes_by_type.items(), key=lambda item: -item[1]))
    return report


def _gguf_header(path: Path) -> dict[str, tuple[tuple, str, int]]:
    return {name: (shape, kind.lower(), size) for name, (shape, kind, size) in gguf_tensor_info(path).items()}


def _safetensors_header(directory: Path) -> dict[str, tuple[tuple, str, int]]:
    """name → (shape, dtype, bytes), from the headers only."""
    from safetensors import safe_open
    itemsize = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    found = {}
    for f in weight_files(directory):
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
                found[name] = (shape, dtype.lower(), math.prod(shape) * itemsize.get(dtype, 0))
    return found


def check_model_command(path: str, model_module: str | None = None) -> int:
    report = check_model(path, model_module)
    print(f"checking {path}")
    for line in report.lines():
        print(line)
    print("PASS" if report.passed else "FAIL")
    return 0 if report.passed else 1
