"""Where and in what precision the model runs: `resolve_placement(config, hf_config)` is the
one place --device and --dtype are turned into a torch device and dtype, and
`threads_per_rank(config)` the one place --num-threads gets its default (cores // tp). create_executor
calls it once; tensor-parallel workers receive the driver's answer in their WorkerSpec
rather than resolving again, so every rank computes on the same kind of device in the
same dtype."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from gateway.config import Config

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype


def resolve_placement(config: Config, hf_config) -> Placement:
    device = _resolve_device(config.device)
    return Placement(device, _resolve_dtype(config.dtype, hf_config, device))


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available "
                         "(this torch build: " + torch.__version__ + "); use --device cpu")
    return torch.device(name)


def _resolve_dtype(name: str, hf_config, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        # bf16 matmuls run on AMX/AVX512-BF16 through oneDNN; elsewhere fp32 is faster on CPU.
        return torch.bfloat16 if torch.backends.mkldnn.is_available() and _cpu_has_bf16() else torch.float32
    declared = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
    return declared if declared in (torch.bfloat16, torch.float16) else torch.bfloat16


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def threads_per_rank(config: Config) -> int:
    """Compute threads of each rank: --num-threads, or the cores shared out among this host's ranks."""
    local_ranks = config.tensor_parallel_size * config.pipeline_parallel_size // config.nnodes
    return config.num_threads or max(1, (os.cpu_count() or 1) // local_ranks)
