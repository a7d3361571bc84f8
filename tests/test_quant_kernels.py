"""gateway.kernels.quant: GGUF blocks packed and dequantized equal gguf-py's numpy dequantize
(the oracle: ggml's formats), int8/int4 quantization error bounds, row slicing and merging, and
every product (quant_linear, quant_embedding) against the torch reference over odd shapes."""

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from gateway.kernels import quant
from gateway.kernels.quant_layout import GGUF_BLOCK_BYTES

SEED = 1234
GGUF_TYPES = sorted(quant.GGUF_QTYPES)
ALL_TYPES = GGUF_TYPES + ["int8", "int4"]
# where a ggml field is a float16 scale: (byte offset in the block, magnitude)
F16_FIELDS = {"q8_0": [(0, 0.05)], "q4_0": [(0, 0.05)], "q4_1": [(0, 0.05), (2, 0.5)],
              "q4_k": [(0, 0.01), (2, 0.01)], "q6_k": [(208, 0.002)]}


def random_blocks(qtype: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """N rows of random ggml blocks: random bytes, with every float16 field finite and small."""
    per, nbytes = GGUF_BLOCK_BYTES[qtype]
    b = rng.integers(0, 256, size=(n, k // per, nbytes), dtype=np.uint8)
    for offset, scale in F16_FIELDS[qtype]:
        v = rng.uniform(-scale, scale, size=(n, k // per)).astype(np.float16)
        b[..., offset:offset + 2] = v.view(np.uint8).reshape(n, k // per, 2)
    return b.reshape(n, -1)


def oracle(qtype: str, raw: np.ndarray, n: int, k: int) -> np.ndarray:
    return gguf_dequantize(raw, getattr(gguf.GGMLQuantizationType, qtype.upper())).reshape(n, k)


def packed(qtype: str, n: int, k: int, seed: int = SEED) -> quant.PackedWeight:
    if qtype in ("int8", "int4"):
        return quant.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05, qtype)
    return quant.pack_gguf(qtype, random_blocks(qtype, n, k, np.random.default_rng(seed)), (n, k))


def k_for(qtype: str, k: int) -> int:
    """K rounded up to what the type allows (the K-quants need whole 256-value super-blocks)."""
    per = GGUF_BLOCK_BYTES.get(qtype, (1, 0))[0]
    return -(-k // per) * per


@pytest.mark.parametrize("qtype", GGUF_TYPES)
@pytest.mark.parametrize("n,k", [(1, 256), (37, 512), (16, 768), (50, 1536)])
def test_pack_gguf_dequantizes_like_ggml(qtype, n, k):
    raw = random_blocks(qtype, n, k, np.random.default_rng(n * k))
    pw = quant.pack_gguf(qtype, raw, (n, k))
    got, ref = quant.dequantize(pw).numpy(), oracle(qtype, raw, n, k)
    assert got.shape == (n, k) and got.dtype == np.float32
    if qtype in ("q8_0", "q4_0", "q4_1"):
        np.testing.assert_array_equal(got, ref)      # float16 scales kept as stored: exact
    else:   # d * sub-block scale (and q4_k's min) rounded to float16: 2^-11 relative
        blocks = ref.reshape(n, -1, 32 if qtype == "q4_k" else 16)
        spread = blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)
        bound = 2.0 ** -10 * (np.abs(blocks).max(-1, keepdims=True) + 2 * spread) + 1e-7
        assert (np.abs(got - ref).reshape(blocks.shape) <= bound).all()
    assert pw.nbytes() <= raw.nbytes * 1.4 * -(-n // 16) * 16 / n     # still packed (q6_k: 8-bit codes)


def test_pack_gguf_refuses_unknown_types_and_split_blocks():
    with pytest.raises(ValueError):
        quant.pack_gguf("q5_k", np.zeros(176, np.uint8), (1, 256))
    with pytest.raises(ValueError):
        quant.pack_gguf("q4_k", np.zeros(144, np.uint8), (2, 128))


@pytest.mark.parametrize("n,k", [(1, 1), (7, 33), (50, 77), (64, 576)])
def test_int8_per_channel_error_is_half_a_step(n, k):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(k)) * torch.rand(n, 1) * 3
    pw = quant.quantize(w, "int8")
    err = (quant.dequantize(pw) - w).abs()
    step = w.abs().amax(1, keepdim=True) / 127
    assert (err <= step * 0.502 + 1e-7).all()
    assert pw.nbytes() == -(-n // 16) * 16 * -(-k // 32) * 32 * (1 + 2 / 32)   # a byte a weight + a f16 scale per 32


@pytest.mark.parametrize("n,k", [(1, 5), (9, 33), (50, 77), (64, 576)])
def test_int4_group_error_is_half_a_step(n, k):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(k))
    pw = quant.quantize(w, "int4")
    err = (quant.dequantize(pw) - w).abs()
    padded = torch.nn.functional.pad(w, (0, (-k) % 32), value=float("nan")).view(n, -1, 32)
    step = (padded.nan_to_num(-1e9).amax(-1) - padded.nan_to_num(1e9).amin(-1)) / 15
    bound = step.repeat_interleave(32, dim=1)[:, :k] * 0.51 + 1e-3 * w.abs().amax()
    assert (err <= bound).all()


def test_quantize_refuses_bad_input():
    with pytest.raises(ValueError):
        quant.quantize(torch.randn(4, 4), "int3")
    with pytest.raises(ValueError):
        quant.quantize(torch.randn(4), "int8")


@pytest.mark.parametrize("qtype", ALL_TYPES)
def test_slice_and_concat_rows_match_the_dequantized_rows(qtype):
    n, k = 53, k_for(qtype, 96)
    pw = packed(qtype, n, k)
    full = quant.dequantize(pw)
    for start, length in ((0, 16), (16, 37), (5, 20), (0, 53), (52, 1), (3, 50)):
        part = quant.slice_rows(pw, start, length)
        assert part.shape == (length, k) and part.qtype == qtype
        torch.testing.assert_close(quant.dequantize(part), full[start:start + length], rtol=0, atol=0)
    pieces = [quant.slice_rows(pw, 0, 5), quant.slice_rows(pw, 5, 27), quant.slice_rows(pw, 32, 21)]
    torch.testing.assert_close(quant.dequantize(quant.concat_rows(pieces)), full, rtol=0, atol=0)
    aligned = [quant.slice_rows(pw, 0, 32), quant.slice_rows(pw, 32, 21)]
    torch.testing.assert_close(quant.dequantize(quant.concat_rows(aligned)), full, rtol=0, atol=0)
    with pytest.raises(ValueError):
        quant.slice_rows(pw, 50, 4)


def test_concat_refuses_mixed_types():
    with pytest.raises(ValueError):
        quant.concat_rows([packed("q8_0", 16, 64), packed("q4_0", 16, 64)])
    with pytest.raises(ValueError):
        quant.concat_rows([packed("q8_0", 16, 64), packed("q8_0", 16, 96)])


@pytest.mark.parametrize("qtype", ALL_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["c", "torch"])
def test_quant_embedding_reads_dequantized_rows(qtype, dtype, impl):
    pw = packed(qtype, 70, k_for(qtype, 45))
    ids = torch.tensor([0, 69, 16, 15, 33, 33])
    got = quant.quant_embedding(ids, pw, dtype, impl=impl)
    assert got.dtype == dtype and got.shape == (6, pw.shape[1])
    torch.testing.assert_close(got, quant.dequantize(pw)[ids].to(dtype), rtol=0, atol=0)
    with pytest.raises(IndexError):
        quant.quant_embedding(torch.tensor([70]), pw, dtype, impl=impl)
    assert quant.quant_embedding(torch.tensor([], dtype=torch.long), pw, dtype, impl=impl).shape == (0, pw.shape[1])


# quant_linear: the C kernels (int8 activations per weight block, vpdpbusd) against the reference


def linear_case(qtype, m, n, k, dtype, seed=0):
    pw = packed(qtype, n, k, seed=seed + n)
    gen = torch.Generator().manual_seed(seed + m)
    x = (torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    return pw, x, bias


def check_against_reference(pw, x, bias, out):
    """out == the reference on x as the kernel quantizes it (fp32 summation order aside), and
    within the activation rounding's own bound of the reference on x itself."""
    block = quant.layout.BLOCK[pw.qtype]
    w = quant.dequantize(pw)
    assert out.dtype == x.dtype and out.shape == (x.shape[0], pw.shape[0])
    emulated = torch.nn.functional.linear(quant.fake_quant_activations(x, block), w, bias.float())
    exact = torch.nn.functional.linear(x.float(), w, bias.float())
    scale = w.abs() @ x.float().abs().t()                            # [N, M]: sum |w x|
    rel = 2.0 ** -7 if x.dtype == torch.bfloat16 else 1e-5           # the output's own rounding
    xf = x.float()
    g = torch.nn.functional.pad(xf, (0, (-xf.shape[1]) % block)).view(xf.shape[0], -1, block)
    half_step = (g.abs().amax(-1, keepdim=True) / 254).expand_as(g).reshape(xf.shape[0], -1)[:, :xf.shape[1]]
    tie = 2 * (half_step[:, None, :] * w.abs()[None]).amax(-1)     # a tie x.5 rounded the other way
    slack = rel * (emulated.abs() + bias.float().abs()) + 1e-5 * scale.t() + 1e-6
    assert ((out.float() - emulated).abs() <= slack + tie).all()
    bound = half_step @ w.abs().t()                                   # |W| |x - x_q|
    assert ((out.float() - exact).abs() <= bound * 1.001 + slack + tie).all()


C_KERNELS = pytest.mark.skipif(not quant.c_kernels_available(),
                               reason="no C quantized kernels on this machine (no compiler or no AVX512-VNNI)")
SHAPES_BY_TYPE = {"q8_0": [(17, 96), (50, 32)], "q4_0": [(33, 160), (16, 64)], "q4_1": [(1, 32), (47, 96)],
                  "q4_k": [(17, 256), (3, 768)], "q6_k": [(31, 256), (16, 768)],
                  "int8": [(19, 77), (48, 33)], "int4": [(23, 45), (5, 200)]}


@C_KERNELS
@pytest.mark.parametrize("qtype", ALL_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_c_kernel_matches_the_reference(qtype, dtype):
    for n, k in SHAPES_BY_TYPE[qtype]:
        for m in (1, 2, 3, 4, 5, 7, 8, 16, 17, 33, 65):
            pw, x, bias = linear_case(qtype, m, n, k, dtype)
            check_against_reference(pw, x, bias, quant.quant_linear(x, pw, bias, impl="vnni"))
    pw, x, _ = linear_case(qtype, 3, *SHAPES_BY_TYPE[qtype][0], dtype)
    out = quant.quant_linear(x, pw, impl="vnni")   # no bias
    check_against_reference(pw, x, torch.zeros(pw.shape[0], dtype=dtype), out)


@C_KERNELS
@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q4_k", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_bf16_kernel_matches_the_reference(qtype, dtype):
    """bf16 activations: the reference on x rounded to bf16, up to fp32 summation order."""
    for n, k in SHAPES_BY_TYPE[qtype]:
        for m in (1, 2, 3, 4, 5, 8, 17, 65):
            pw, x, bias = linear_case(qtype, m, n, k, dtype)
            out = quant.quant_linear(x, pw, bias, impl="bf16")
            assert out.dtype == dtype and out.shape == (m, n)
            w = quant.dequantize(pw)
            expected = torch.nn.functional.linear(x.bfloat16().float(), w, bias.float())
            scale = x.bfloat16().float().abs() @ w.abs().t() + bias.float().abs()
            rel = 2.0 ** -8 if dtype == torch.bfloat16 else 0.0
            assert ((out.float() - expected).abs() <= rel * expected.abs() + 2e-5 * scale + 1e-6).all()


@C_KERNELS
def test_quant_linear_bf16_on_8_bit_codes_takes_the_vnni_kernel():
    pw, x, bias = linear_case("q8_0", 3, 20, 64, torch.float32)
    torch.testing.assert_close(quant.quant_linear(x, pw, bias, impl="bf16"), quant.quant_linear(x, pw, bias, impl="vnni"),
                               rtol=0, atol=0)
    # the defaults: bf16 x → bf16 activations for 4-bit codes, vnni for 8-bit ones; fp32 x → f32
    pw4, x4, bias4 = linear_case("q4_1", 3, 20, 64, torch.bfloat16)
    assert torch.equal(quant.quant_linear(x4, pw4, bias4, impl="c"), quant.quant_linear(x4, pw4, bias4, impl="bf16"))
    xb, bb = x.bfloat16(), bias.bfloat16()
    assert torch.equal(quant.quant_linear(xb, pw, bb, impl="c"), quant.quant_linear(xb, pw, bb, impl="vnni"))
    for w in (pw, pw4):
        assert torch.equal(quant.quant_linear(x, w, bias, impl="c"), quant.quant_linear(x, w, bias, impl="f32"))


@C_KERNELS
@pytest.mark.parametrize("qtype", ALL_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_f32_kernel_matches_the_reference(qtype, dtype):
    """fp32 FMAs on x as given: the reference up to fp32 summation order."""
    for n, k in SHAPES_BY_TYPE[qtype]:
        for m in (1, 2, 3, 4, 5, 8, 17, 65):
            pw, x, bias = linear_case(qtype, m, n, k, dtype)
            out = quant.quant_linear(x, pw, bias, impl="f32")
            assert out.dtype == dtype and out.shape == (m, n)
            w = quant.dequantize(pw)
            expected = torch.nn.functional.linear(x.float(), w, bias.float())
            scale = x.float().abs() @ w.abs().t() + bias.float().abs()
            rel = 2.0 ** -8 if dtype == torch.bfloat16 else 0.0
            assert ((out.float() - expected).abs() <= rel * expected.abs() + 1e-6 * scale + 1e-7).all()


@C_KERNELS
@pytest.mark.parametrize("impl", ["vnni", "bf16", "f32"])
def test_a_rows_result_does_not_depend_on_the_batch(impl):
    """Each row is quantized and summed alone, in one order: the same bits at any M and position
    (batched and single-sequence decoding agree exactly)."""
    for qtype in ("q4_1", "q8_0"):
        pw, x, bias = linear_case(qtype, 23, 50, 96, torch.bfloat16)
        full = quant.quant_linear(x, pw, bias, impl=impl)
        for lo, hi in ((0, 1), (5, 6), (3, 7), (4, 23), (22, 23)):
            assert torch.equal(quant.quant_linear(x[lo:hi].contiguous(), pw, bias, impl=impl), full[lo:hi])


def test_native_kernels_says_whether_products_run_in_c():
    assert quant.NATIVE_KERNELS == quant.c_kernels_available()


@C_KERNELS
def test_quant_linear_c_kernel_on_the_default_models_shapes():
    for qtype, n, k in (("q4_1", 960, 576), ("q4_1", 576, 1536), ("q8_0", 4099, 576)):
        for m in (1, 6):
            pw, x, bias = linear_case(qtype, m, n, k, torch.bfloat16)
            check_against_reference(pw, x, bias, quant.quant_linear(x, pw, bias, impl="vnni"))
            if qtype == "q8_0":
                continue
            bf16 = quant.quant_linear(x, pw, bias, impl="bf16")
            expected = torch.nn.functional.linear(x.float(), quant.dequantize(pw), bias.float())
            assert ((bf16.float() - expected).abs() <= 2.0 ** -8 * expected.abs() + 1e-3).all()


@pytest.mark.parametrize("qtype", ["q4_1", "q8_0", "int4"])
def test_the_torch_fallback_is_the_reference(qtype):
    pw, x, bias = linear_case(qtype, 5, 21, k_for(qtype, 64), torch.bfloat16)
    expected = quant.reference_linear(x, pw, bias)
    torch.testing.assert_close(quant.quant_linear(x, pw, bias, impl="torch"), expected, rtol=0, atol=0)
    half = x.half()    # a dtype the C kernels do not take: the reference, whatever impl says
    torch.testing.assert_close(quant.quant_linear(half, pw, impl="c"), quant.reference_linear(half, pw))


def test_a_weight_the_kernels_cannot_read_takes_the_reference():
    pw = packed("q4_1", 32, 64)
    strided = quant.PackedWeight("q4_1", pw.shape, {k: v.transpose(0, 1).contiguous().transpose(0, 1)
                                                     for k, v in pw.data.items()})
    x = torch.randn(3, 64)
    assert quant.quant_cpu.linear(x, strided, None) is None
    torch.testing.assert_close(quant.quant_linear(x, strided), quant.reference_linear(x, pw), rtol=0, atol=0)


def test_the_environment_forces_the_fallback_at_import():
    import subprocess
    import sys
    code = ("import torch; from gateway.kernels import quant, quant_cpu\n"
            "quant_cpu.linear = None\n"                       # any call into C would now fail
            "pw = quant.quantize(torch.randn(20, 40), 'int4'); x = torch.randn(3, 40)\n"
            "assert torch.equal(quant.quant_linear(x, pw), quant.reference_linear(x, pw)); print('ok')")
    env = {**__import__("os").environ, "GATEWAY_QUANT_KERNELS": "torch"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


def test_quant_linear_refuses_a_mismatched_input():
    pw = packed("q8_0", 16, 64)
    with pytest.raises(ValueError):
        quant.quant_linear(torch.randn(2, 64), pw, impl="fast")
    with pytest.raises(ValueError):
        quant.quant_linear(torch.randn(2, 32), pw)
    with pytest.raises(ValueError):
        quant.quant_linear(torch.randn(64), pw)
