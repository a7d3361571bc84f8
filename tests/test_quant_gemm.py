"""The W8A8 kernel for batched steps (cpu/quant_gemm.c: int8 activations per token, int8
weights per output channel, vpdpbusd): against its torch reference over odd shapes (M, N, K not
multiples of its 6 x 64 register tile), the weights it multiplies by (an "int8" weight as it is,
any other type requantized per channel), and the dispatch by M of quant_linear's default."""

import pytest
import torch

from gateway.kernels import quant
from test_quant_kernels import ALL_TYPES, k_for, linear_case, packed

GEMM = pytest.mark.skipif(not quant.c_kernels_available() or not quant.GEMM_KERNEL,
                          reason="no W8A8 kernel on this machine (no compiler or no AVX512-VNNI)")


def gemm_reference(x: torch.Tensor, pw: quant.PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """What the kernel computes, in fp32: x rounded to int8 per token, times gemm_weight(pw)."""
    b = None if bias is None else bias.float()
    return torch.nn.functional.linear(quant.fake_quant_per_token(x), quant.dequantize(quant.gemm_weight(pw)), b)


def check(x, pw, bias, out):
    ref = gemm_reference(x, pw, bias)
    assert out.dtype == x.dtype and out.shape == ref.shape
    rel = 2.0 ** -8 if x.dtype == torch.bfloat16 else 1e-6           # the output's own rounding
    xq, w = quant.fake_quant_per_token(x), quant.dequantize(quant.gemm_weight(pw))
    scale = xq.abs() @ w.abs().t() + (0 if bias is None else bias.float().abs())
    # the int32 sum is exact: what is left is one fp32 rescale (a few ulps) and the output rounding
    assert ((out.float() - ref).abs() <= rel * ref.abs() + 1e-6 * scale + 1e-6).all()


@GEMM
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k", [(1, 32), (19, 77), (64, 96), (80, 33), (130, 200), (192, 576)])
def test_gemm_matches_its_reference_over_odd_shapes(dtype, n, k):
    for m in (1, 2, 5, 6, 7, 13, 47, 48, 49, 100):
        pw, x, bias = linear_case("int8", m, n, k, dtype)
        check(x, pw, bias, quant.quant_linear(x, pw, bias, impl="gemm"))
    pw, x, _ = linear_case("int8", 9, n, k, dtype)
    check(x, pw, None, quant.quant_linear(x, pw, impl="gemm"))


@GEMM
@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_gemm_takes_every_type_through_its_int8_copy(qtype):
    n, k = 37, k_for(qtype, 96)
    pw, x, bias = linear_case(qtype, 20, n, k, torch.bfloat16)
    check(x, pw, bias, quant.quant_linear(x, pw, bias, impl="gemm"))
    copy = quant.gemm_weight(pw)
    assert copy.qtype == "int8" and copy.shape == pw.shape and quant.gemm_weight(pw) is copy   # made once
    w, wq = quant.dequantize(pw), quant.dequantize(copy)
    step = w.abs().amax(1, keepdim=True) / 127                       # the int8 copy: within half a step
    assert ((wq - w).abs() <= step * 0.502 + 1e-7).all()


@GEMM
def test_an_int8_weight_is_used_as_it_is():
    pw = packed("int8", 40, 64)
    assert quant.gemm_weight(pw) is pw


@GEMM
def test_a_rows_result_does_not_depend_on_the_batch():
    pw, x, bias = linear_case("q4_1", 61, 50, 96, torch.bfloat16)
    full = quant.quant_linear(x, pw, bias, impl="gemm")
    for lo, hi in ((0, 1), (5, 6), (3, 10), (6, 61), (48, 61), (60, 61)):
        assert torch.equal(quant.quant_linear(x[lo:hi].contiguous(), pw, bias, impl="gemm"), full[lo:hi])


@GEMM
def test_the_default_kernel_takes_gemm_from_the_crossover_up_for_bf16_only(monkeypatch):
    rows = quant.GEMM_CROSSOVER
    monkeypatch.setattr(quant, "GEMM_MIN_ROWS", rows)   # on, as GATEWAY_QUANT_KERNELS=w8a8 sets it
    pw, x, bias = linear_case("q4_1", rows, 50, 96, torch.bfloat16)
    assert torch.equal(quant.quant_linear(x, pw, bias), quant.quant_linear(x, pw, bias, impl="gemm"))
    below = x[:rows - 1].contiguous()
    assert torch.equal(quant.quant_linear(below, pw, bias), quant.quant_linear(below, pw, bias, impl="bf16"))
    xf, bf = x.float(), bias.float()   # fp32 models keep fp32 FMAs at any M
    assert torch.equal(quant.quant_linear(xf, pw, bf), quant.quant_linear(xf, pw, bf, impl="f32"))
    assert not torch.equal(quant.quant_linear(x, pw, bias, impl="gemm"), quant.quant_linear(x, pw, bias, impl="bf16"))


def test_without_the_kernel_gemm_falls_back_to_a_correct_product(monkeypatch):
    """No VNNI (the probe says so): quant_linear's gemm and default paths still give the product."""
    monkeypatch.setattr(quant, "GEMM_KERNEL", False)
    pw, x, bias = linear_case("q4_1", 20, 30, 64, torch.bfloat16)
    exact = quant.reference_linear(x, pw, bias).float()
    for impl in ("gemm", "c"):
        out = quant.quant_linear(x, pw, bias, impl=impl)
        assert (out.float() - exact).abs().max() <= 0.05 * exact.abs().max()
