"""Imports point down the layers. Every module under gateway/ is found with pkgutil, imported
(in a subprocess, so that the Triton kernels are not decorated here before
tests/test_kernels.py sets TRITON_INTERPRET), and its imports are read from its AST, those
inside functions and under TYPE_CHECKING included: a module may import its own component
and any component in a LOWER layer, never a higher layer or a peer in its own layer.

Two placements are deliberate:
  * gateway.scheduler.sequence sits with sampling, not with the scheduler: a Sequence is the
    per-request state that both the scheduler advances and the sampler reads, and it imports
    nothing but SamplingParams.
  * the bare `gateway` package (__init__.py: __version__ and lazy LLM / SamplingParams for
    users) is the top facade; importing it for __version__ is no dependency edge (Python
    runs gateway/__init__ before any submodule anyway), so edges into it are not checked."""

from __future__ import annotations

import ast
import importlib.util
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import gateway

# Top → bottom. Each layer maps component names to the module prefixes they own.
LAYERS: list[dict[str, tuple[str, ...]]] = [
    {"entry": ("gateway.cli", "gateway.batch"), "facade": ("gateway",)},
    {"api": ("gateway.api",), "chat": ("gateway.chat", "gateway.chat_backends")},
    {"metrics": ("gateway.metrics",)},
    {"engine": ("gateway.engine",)},
    {"executor": ("gateway.executor",), "scheduler": ("gateway.scheduler",)},
    {"sampling": ("gateway.sampling", "gateway.scheduler.sequence")},
    {"models": ("gateway.models",)},
    {"kernels": ("gateway.kernels",)},
    {"config": ("gateway.config",), "templates": ("gateway.templates",)},
]
ROOT = "gateway"
OPTIONAL_DEPENDENCIES = {"triton"}   # a module needing one of these may fail to import without it


def component_of(module: str) -> tuple[int, str]:
    """(layer index, component) by the longest owning prefix; the root matches only itself."""
    best: tuple[int, int, str] | None = None
    for level, components in enumerate(LAYERS):
        for name, prefixes in components.items():
            for prefix in prefixes:
                owns = module == prefix or (prefix != ROOT and module.startswith(prefix + "."))
                if owns and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), level, name)
    if best is None:
        raise LookupError(f"{module} is in no layer: add it to LAYERS")
    return best[1], best[2]


def all_modules() -> list[str]:
    return [ROOT] + sorted(info.name for info in pkgutil.walk_packages(gateway.__path__, ROOT + "."))


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Every gateway module `source` imports, at any depth of the tree."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: resolve against this module's package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:   # `from gateway import kernels` imports gateway.kernels
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {name for name in found if name == ROOT or name.startswith(ROOT + ".")}


def violations(module: str, targets: set[str]) -> list[str]:
    level, component = component_of(module)
    wrong = []
    for target in sorted(targets - {ROOT}):
        t_level, t_component = component_of(target)
        if t_component == component or t_level > level:
            continue
        where = "a higher layer" if t_level < level else "a peer in its own layer"
        wrong.append(f"{module} ({component}) imports {target} ({t_component}, {where})")
    return wrong


def source_of(module: str) -> tuple[str, bool]:
    spec = importlib.util.find_spec(module)
    return Path(spec.origin).read_text(), spec.submodule_search_locations is not None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    edges = {}
    for module in modules:
        source, is_package = source_of(module)
        edges[module] = imported_modules(source, module, is_package, known)
    return edges


def test_every_module_is_in_a_layer_and_imports_cleanly():
    modules = all_modules()
    assert len(modules) > 40 and "gateway.engine.core" in modules and "gateway.kernels.cpu_ops" in modules
    for module in modules:
        component_of(module)
    script = ("import importlib, sys\n"
              "for name in sys.argv[1:]:\n"
              "    try:\n"
              "        importlib.import_module(name)\n"
              "    except ModuleNotFoundError as exc:\n"
              f"        if (exc.name or '').split('.')[0] not in {sorted(OPTIONAL_DEPENDENCIES)!r}:\n"
              "            raise\n")
    done = subprocess.run([sys.executable, "-c", script, *modules], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]


def test_no_module_imports_a_higher_layer_or_a_peer(graph):
    wrong = [line for module, targets in graph.items() for line in violations(module, targets)]
    assert wrong == []


def test_the_check_sees_function_level_and_type_checking_imports(graph):
    """The checker itself: plant upward imports in a kernels module's source and it reports them."""
    module = "gateway.kernels.reference"
    source, _ = source_of(module)
    planted = source + ("\n\ndef _planted():\n    from gateway.engine import core\n"
                        "\n\nif TYPE_CHECKING:\n    from gateway.models.llama import LlamaForCausalLM\n")
    found = violations(module, imported_modules(planted, module, False, set(graph)))
    assert found == ["gateway.kernels.reference (kernels) imports gateway.engine.core (engine, a higher layer)",
                     "gateway.kernels.reference (kernels) imports gateway.models.llama (models, a higher layer)"]
    peer = violations("gateway.scheduler.scheduler", {"gateway.executor.batch"})
    assert peer == ["gateway.scheduler.scheduler (scheduler) imports gateway.executor.batch "
                    "(executor, a peer in its own layer)"]


def test_sessions_do_not_import_the_app(graph):
    assert "gateway.api.app" not in graph["gateway.api.sessions"]
