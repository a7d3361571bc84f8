"""`gateway check-model PATH [--model-module F]`: does a checkpoint fit its model class?

Order: load the user's model module (if any) → resolve the path (a GGUF file is converted
once into the cache, like `serve` does) → read config.json → resolve the class through the
registry → build the model on torch's "meta" device (shapes only, nothing allocated) and
ask it for the tensor names and shapes it expects → read the checkpoint's names and shapes
from the safetensors headers (no tensor data is read) → print a report: missing,
unexpected and shape-mismatched tensors, and the count of matching ones. Returns 0 when
everything matches, 1 otherwise (the CLI maps config/path errors to 2)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gateway.config import Config
from gateway.models import registry
from gateway.models.loader import checkpoint_shapes, load_hf_config, resolve_source

# Checkpoint tensors every loader skips (see LlamaForCausalLM.load_weights).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class CheckReport:
    ok: list[str] = field(default_factory=list)
    missing: list[tuple[str, tuple]] = field(default_factory=list)      # expected, not in the checkpoint
    unexpected: list[tuple[str, tuple]] = field(default_factory=list)   # in the checkpoint, not expected
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)   # name, expected, found
    ignored: list[str] = field(default_factory=list)

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
    return compare(expected_shapes(model_class, arch), checkpoint_shapes(source.directory),
                   arch.tie_word_embeddings)


def check_model_command(path: str, model_module: str | None = None) -> int:
    report = check_model(path, model_module)
    print(f"checking {path}")
    for line in report.lines():
        print(line)
    print("PASS" if report.passed else "FAIL")
    return 0 if report.passed else 1
