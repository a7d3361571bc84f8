"""Triton kernels match the torch references (gateway.kernels.reference) under TRITON_INTERPRET=1.

TRITON_INTERPRET must be set before the kernels are decorated, so it is set at the top of
this module, before anything imports triton_ops. If another module imported them first
without it, every test here is skipped with that reason (run this file on its own)."""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")
pytest.importorskip("numpy")     # the interpreter needs it; triton does not declare it

from gateway.kernels import reference, triton_attention, triton_ops  # noqa: E402
from gateway.kernels.metadata import AttentionMetadata  # noqa: E402

if not triton_attention.INTERPRET:
    pytest.skip("gateway's Triton kernels were decorated before TRITON_INTERPRET=1 was set "
                "(imported by an earlier test module); run tests/test_kernels.py on its own",
                allow_module_level=True)

pytestmark = pytest.mark.triton

# Elementwise kernels round once where the reference may round twice: ~1-2 ulps of the dtype.
# (The interpreter also truncates fp32 -> bf16 where a GPU rounds to nearest: one more ulp.)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5),
       torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}
# Attention: the decode reference rounds q.k scores to the input dtype before softmax and
# probabilities before p.v; the kernels keep both in fp32, so allow a few ulps of the outputs.
ATTN_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5),
            torch.float16: dict(atol=3e-3, rtol=3e-3),
            torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


def make_batch(seqs, num_decodes, block_size, num_kv_heads, head_dim, dtype, seed=0):
    """Random paged caches plus hand-built metadata for seqs = [(query_len, context_len)], decodes
    first. Blocks are handed out in shuffled order (tables are not contiguous) and a few spare
    blocks hold garbage that a wrong table lookup would read."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-ctx // block_size) for _, ctx in seqs]
    num_blocks = sum(blocks_per_seq) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(seqs), max(blocks_per_seq) + 1, dtype=torch.int32)  # + a padded column
    query_start, slots, used = [0], [], 0
    for i, ((query_len, ctx), nb) in enumerate(zip(seqs, blocks_per_seq)):
        tables[i, :nb] = order[used:used + nb]
        used += nb
        query_start.append(query_start[-1] + query_len)
        positions = torch.arange(ctx - query_len, ctx)
        slots.append(tables[i, positions // block_size].long() * block_size + positions % block_size)
    seq_lens = [ctx for _, ctx in seqs]
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots), query_start_loc=torch.tensor(query_start, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=tables,
        max_query_len=max(q for q, _ in seqs), max_seq_len=max(seq_lens), num_decodes=num_decodes,
        query_start_loc_cpu=query_start, seq_lens_cpu=seq_lens)
    return k_cache, v_cache, meta


def random_q(meta, num_heads, head_dim, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(meta.query_start_loc_cpu[-1], num_heads, head_dim, generator=gen).to(dtype)


# (num_heads, num_kv_heads, head_dim, block_size, dtype, num_decodes, [(query_len, context_len)])
ATTENTION_CASES = {
    "mixed_gqa4:2_d64_bs16_fp16": (4, 2, 64, 16, FP16, 2, [(1, 17), (1, 33), (7, 7), (5, 37)]),
    "smollm_9:3_d64_bs16_bf16_block_edges": (9, 3, 64, 16, BF16, 2,
                                             [(1, 32), (1, 33), (16, 48), (9, 49), (30, 30)]),
    "mha_2:2_d128_bs32_fp32": (2, 2, 128, 32, FP32, 1, [(1, 64), (3, 65), (12, 40)]),
    "group8_8:1_d128_bs64_bf16": (8, 1, 128, 64, BF16, 1, [(1, 129), (4, 64), (2, 65)]),
    "decodes_only_4:2_d64_bs32_fp16": (4, 2, 64, 32, FP16, 3, [(1, 1), (1, 31), (1, 96)]),
    "prefill_only_two_q_tiles_2:1_d64_bs16_fp32": (2, 1, 64, 16, FP32, 0, [(70, 90), (33, 33)]),
    "chunk_of_one_token_4:2_d64_bs64_bf16": (4, 2, 64, 64, BF16, 0, [(1, 64), (1, 65)]),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES), ids=list(ATTENTION_CASES))
def test_paged_attention_matches_reference(case):
    num_heads, num_kv_heads, head_dim, block_size, dtype, nd, seqs = ATTENTION_CASES[case]
    k_cache, v_cache, meta = make_batch(seqs, nd, block_size, num_kv_heads, head_dim, dtype)
    q = random_q(meta, num_heads, head_dim, dtype)
    scale = head_dim ** -0.5
    out = triton_ops.paged_attention(q, k_cache, v_cache, meta, scale)
    expected = reference.paged_attention(q, k_cache, v_cache, meta, scale)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, expected, **ATTN_TOL[dtype])


@pytest.mark.parametrize("num_splits", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_split_k_decode_matches_reference_including_empty_splits(num_splits, dtype):
    # With 5 splits of 64-token tiles, the 1- and 17-token contexts leave most splits empty.
    k_cache, v_cache, meta = make_batch([(1, 1), (1, 17), (1, 130)], 3, 16, 2, 64, dtype)
    q = random_q(meta, 6, 64, dtype)
    out = torch.full_like(q, float("nan"))
    triton_attention.decode_attention(q, k_cache, v_cache, out, meta, 0.125, num_splits=num_splits)
    expected = reference.paged_attention(q, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(out, expected, **ATTN_TOL[dtype])


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_padding_rows_are_safe_and_leave_real_rows_exact(splits):
    # CUDA-graph padding: rows with seq_len 1 or 0 over an all-zero block-table row, and the
    # split count fixed through meta.decode_splits (replays never see seq_lens_cpu).
    k_cache, v_cache, meta = make_batch([(1, 40), (1, 1), (1, 1), (1, 70)], 4, 16, 2, 64, FP16)
    q = random_q(meta, 4, 64, FP16)
    meta.block_tables[1:3] = 0
    meta.seq_lens[2] = 0
    meta.decode_splits = splits
    meta.seq_lens_cpu = None            # must not be read once decode_splits is set
    out = torch.full_like(q, float("nan"))
    triton_attention.decode_attention(q, k_cache, v_cache, out, meta, 0.125)
    assert torch.isfinite(out).all() and not out[2].any()        # an empty context gives zeros
    meta.seq_lens_cpu = [40, 1, 0, 70]
    expected = reference.paged_attention(q, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(out[[0, 1, 3]], expected[[0, 1, 3]], **ATTN_TOL[FP16])


def test_num_splits_fills_the_gpu_only_for_long_contexts():
    assert triton_attention.choose_num_splits(4, 8, 200) == 1
    assert triton_attention.choose_num_splits(1, 8, 4096) == 16
    assert triton_attention.choose_num_splits(256, 8, 4096) == 1
    assert triton_attention.choose_num_splits(2, 8, 1000) == 4


@pytest.mark.parametrize("dtype", [FP16, BF16, FP32])
def test_store_kv_then_attention_matches_reference_and_skips_padding(dtype):
    k_cache, v_cache, meta = make_batch([(1, 20), (6, 38)], 1, 16, 3, 64, dtype)
    num_tokens = meta.query_start_loc_cpu[-1]
    meta.slot_mapping[[0, 3]] = -1                       # padding tokens must not be written
    qkv = torch.randn(num_tokens + 1, 9 + 3 + 3, 64).to(dtype)[1:]   # q|k|v views, strided
    q, key, value = qkv[:, :9], qkv[:, 9:12], qkv[:, 12:]
    # The Triton caches are views into buffers with a guard block either side: a -1 slot
    # that slipped through would land in the guard before the cache.
    buffers = [torch.cat([torch.zeros_like(c[:1]), c, torch.zeros_like(c[:1])]) for c in (k_cache, v_cache)]
    caches = [(buffers[0][1:-1], buffers[1][1:-1]), (k_cache.clone(), v_cache.clone())]
    triton_ops.store_kv(key, value, *caches[0], meta.slot_mapping)
    reference.store_kv(key, value, *caches[1], meta.slot_mapping)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    assert not any(b[[0, -1]].any() for b in buffers)
    out = triton_ops.paged_attention(q, *caches[0], meta, 0.125)
    torch.testing.assert_close(out, reference.paged_attention(q, *caches[1], meta, 0.125),
                               **ATTN_TOL[dtype])


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 64), (9, 3, 64), (2, 1, 128)])
@pytest.mark.parametrize("dtype", [FP16, BF16, FP32])
def test_rotary_embedding_in_place_matches_reference(num_heads, num_kv_heads, head_dim, dtype):
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cache = reference.build_cos_sin_cache(head_dim, 4096, inv_freq)
    positions = torch.tensor([0, 1, 7, 4095, 300])
    qkv = torch.randn(5, num_heads + 2 * num_kv_heads, head_dim).to(dtype)
    q, k = qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads]   # strided views
    q_ref, k_ref = q.clone(), k.clone()
    v_before = qkv[:, num_heads + num_kv_heads:].clone()
    got = triton_ops.rotary_embedding(positions, q, k, cache)
    reference.rotary_embedding(positions, q_ref, k_ref, cache)
    assert got[0] is q and got[1] is k
    torch.testing.assert_close(q, q_ref, **TOL[dtype])
    torch.testing.assert_close(k, k_ref, **TOL[dtype])
    assert torch.equal(qkv[:, num_heads + num_kv_heads:], v_before)   # neighbours untouched


@pytest.mark.parametrize("hidden", [64, 576])
@pytest.mark.parametrize("dtype", [FP16, BF16, FP32])
def test_rms_norm_matches_reference(hidden, dtype):
    x = torch.randn(6, hidden).to(dtype) * 3
    weight = (torch.rand(hidden) + 0.5).to(dtype)
    out = triton_ops.rms_norm(x, weight, 1e-6)
    expected = reference.rms_norm(x, weight, 1e-6)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("hidden", [64, 576])
@pytest.mark.parametrize("dtype", [FP16, BF16, FP32])
def test_fused_add_rms_norm_returns_normed_and_sum_without_touching_inputs(hidden, dtype):
    x, residual = torch.randn(2, 3, hidden).to(dtype), torch.randn(2, 3, hidden).to(dtype)
    weight = (torch.rand(hidden) + 0.5).to(dtype)
    x_before, residual_before = x.clone(), residual.clone()
    normed, summed = triton_ops.fused_add_rms_norm(x, residual, weight, 1e-5)
    exp_normed, exp_summed = reference.fused_add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(summed, exp_summed, **TOL[dtype])
    torch.testing.assert_close(normed, exp_normed, **TOL[dtype])
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


@pytest.mark.parametrize("inter", [80, 1500])
@pytest.mark.parametrize("dtype", [FP16, BF16, FP32])
def test_silu_and_mul_matches_reference(inter, dtype):
    x = torch.randn(3, 2 * inter).to(dtype) * 2
    out = triton_ops.silu_and_mul(x)
    assert out.shape == (3, inter)
    torch.testing.assert_close(out, reference.silu_and_mul(x), **TOL[dtype])


def test_empty_batches_launch_nothing():
    k_cache = torch.zeros(2, 16, 2, 64)
    empty = torch.zeros(0, 2, 64)
    triton_ops.store_kv(empty, empty, k_cache, k_cache.clone(), torch.zeros(0, dtype=torch.int64))
    assert triton_ops.silu_and_mul(torch.zeros(0, 10)).shape == (0, 5)
    assert triton_ops.rms_norm(torch.zeros(0, 8), torch.ones(8), 1e-6).shape == (0, 8)
    assert not k_cache.any()
