"""Linear's prepacked CPU paths against plain fp32 math: the merged gate|up weight packed as
two halves (silu and the product as oneDNN post-ops) and the ordinary packed product."""

import pytest
import torch
import torch.nn.functional as F

from gateway.models.layers import Linear

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def gate_up_linear(hidden: int, inter: int, seed: int = 0) -> Linear:
    g = torch.Generator().manual_seed(seed)
    linear = Linear(hidden, 2 * inter, shard_sizes={"gate": inter, "up": inter})
    linear.weight.data.copy_(torch.randn(2 * inter, hidden, generator=g) * hidden ** -0.5)
    return linear.to(torch.bfloat16)


def swiglu_fp32(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    gate, up = (x.float() @ weight.float().T).chunk(2, dim=-1)
    return F.silu(gate) * up


@needs_onednn
@pytest.mark.parametrize("tokens", [1, 7, 64, 300])
@pytest.mark.parametrize("hidden,inter", [(64, 96), (576, 1536)])
def test_prepacked_gate_up_matches_fp32(tokens, hidden, inter):
    linear = gate_up_linear(hidden, inter)
    x = torch.randn(tokens, hidden).bfloat16()
    expected = swiglu_fp32(x, linear.weight)
    unpacked = linear.silu_and_mul(x)
    linear.prepack()
    assert linear._packed_gate_up is not None and linear._packed is None
    packed = linear.silu_and_mul(x)
    assert packed.shape == (tokens, inter) and packed.dtype == torch.bfloat16
    scale = expected.abs().max().item()
    for got in (unpacked, packed):
        assert (got.float() - expected).abs().max().item() <= 0.02 * scale
    # The merged product itself still works once packed (the halves side by side).
    full = linear(x).float()
    assert (full - x.float() @ linear.weight.float().T).abs().max().item() <= 0.02 * full.abs().max().item()


@needs_onednn
def test_prepacked_gate_up_keeps_gate_and_up_apart():
    """silu applies to the gate half only: swapping the halves must change the result."""
    linear = gate_up_linear(64, 96, seed=1)
    x = torch.randn(5, 64).bfloat16()
    linear.prepack()
    swapped = torch.cat(linear.weight.chunk(2, dim=0)[::-1])
    got, wrong = linear.silu_and_mul(x).float(), swiglu_fp32(x, swapped)
    assert (got - swiglu_fp32(x, linear.weight)).abs().max() < (got - wrong).abs().max()


def test_fp32_and_biased_linears_are_not_split():
    fp32 = Linear(8, 12, shard_sizes={"gate": 6, "up": 6})
    fp32.prepack()
    assert fp32._packed_gate_up is None and fp32._packed is None
    biased = Linear(8, 12, bias=True, shard_sizes={"gate": 6, "up": 6}).to(torch.bfloat16)
    biased.prepack()
    assert biased._packed_gate_up is None
