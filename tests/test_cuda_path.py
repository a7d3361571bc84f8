"""The CUDA path's wiring, checked without a GPU.

* Dispatch: with the auto backend, CUDA tensors go to the Triton ops for every kernel. A stub
  module stands in for gateway.kernels.triton_ops, so triton is never imported here (that
  would break tests/test_kernels.py, which must set TRITON_INTERPRET first). The choice is
  made once per device kind (not per call), and a CPU without the C library still falls
  back to the torch reference.
* Construction: the model builds under a non-CPU device context (meta stands in for cuda)
  with every parameter and buffer on that device, the rotary table included; the table is
  built from a CPU inv_freq, which once made construction on CUDA fail."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import gateway.kernels as kernels
from gateway.kernels import cpu_ops

KERNELS = ("store_kv", "paged_attention", "rms_norm", "fused_add_rms_norm", "silu_and_mul",
           "rotary_embedding")


class _OnCuda:
    is_cuda = True


@pytest.fixture(autouse=True)
def _fresh_dispatch():
    """Each test resolves from scratch and leaves no stub or patched choice behind."""
    kernels.set_backend("auto")
    yield
    kernels.set_backend("auto")


def test_auto_backend_sends_cuda_tensors_to_triton_for_every_kernel(monkeypatch):
    calls = []
    stub = types.ModuleType("gateway.kernels.triton_ops")
    for name in KERNELS:
        setattr(stub, name, lambda *args, _name=name: calls.append(_name))
    monkeypatch.setitem(sys.modules, "gateway.kernels.triton_ops", stub)
    monkeypatch.setattr(kernels, "triton_ops", stub, raising=False)
    x = _OnCuda()
    kernels.store_kv(x, x, x, x, x)
    kernels.paged_attention(x, x, x, None, 1.0)
    kernels.rms_norm(x, x, 1e-6)
    kernels.fused_add_rms_norm(x, x, x, 1e-6)
    kernels.silu_and_mul(x)
    kernels.rotary_embedding(torch.zeros(1, dtype=torch.long), x, x, x)   # dispatches on q
    assert calls == list(KERNELS)
    kernels.set_backend("torch")
    assert kernels._impl(x) is kernels.reference                          # forced references


def _count_library_checks(monkeypatch, present: bool) -> list[int]:
    checks = []
    monkeypatch.setattr(cpu_ops, "available", lambda: checks.append(1) or present)
    return checks


def test_the_cpu_implementation_is_chosen_once_not_per_kernel_call(monkeypatch):
    checks = _count_library_checks(monkeypatch, present=True)
    x = torch.randn(3, 64)
    for _ in range(5):
        kernels.rms_norm(x, torch.ones(64), 1e-6)
        kernels.silu_and_mul(torch.randn(3, 128))
    assert len(checks) == 1 and kernels._impl(x) is cpu_ops
    kernels.set_backend("auto")                                           # a new choice asks again
    kernels.silu_and_mul(torch.randn(3, 128))
    assert len(checks) == 2


def test_without_the_c_library_cpu_kernels_fall_back_to_the_reference(monkeypatch):
    checks = _count_library_checks(monkeypatch, present=False)
    x, weight = torch.randn(3, 64), torch.rand(64)
    out = [kernels.rms_norm(x, weight, 1e-6) for _ in range(3)]
    assert kernels._impl(x) is kernels.reference and len(checks) == 1
    torch.testing.assert_close(out[0], kernels.reference.rms_norm(x, weight, 1e-6), rtol=0, atol=0)


def test_model_builds_with_every_tensor_on_the_ambient_device():
    import transformers
    from gateway.models import registry
    hf_config = transformers.LlamaConfig(architectures=["LlamaForCausalLM"], vocab_size=256,
                                         hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=64)
    model_class, arch = registry.resolve(hf_config)
    assert arch.inv_freq.device.type == "cpu"
    with torch.device("meta"):
        model = model_class(arch)
    model.to(torch.bfloat16)
    tensors = [*model.parameters(), *model.buffers(), *(layer.attn.cos_sin_cache for layer in model.layers)]
    assert {t.device.type for t in tensors} == {"meta"}
    assert model.cos_sin_cache.dtype == torch.float32 and model.cos_sin_cache.shape == (64, 64)
    assert all(layer.attn.cos_sin_cache is model.cos_sin_cache for layer in model.layers)
