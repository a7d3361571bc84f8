"""The C CPU kernels (gateway.kernels.cpu_ops) equal the torch references."""

from __future__ import annotations

import ctypes

import pytest
import torch

from gateway.kernels import cpu_ops, reference
from gateway.kernels.metadata import AttentionMetadata

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="no C compiler: the torch fallback is used")
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def decode_case(dtype, num_heads, num_kv_heads, head_dim, block_size, seq_lens, prefill_len=0):
    """Random paged caches; sequences [0, len(seq_lens)) decode, plus an optional prefill chunk."""
    torch.manual_seed(0)
    lens = list(seq_lens) + ([prefill_len + 5] if prefill_len else [])
    blocks_per_seq = [-(-n // block_size) for n in lens]
    num_blocks = sum(blocks_per_seq) + 3
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim).to(dtype)
    perm = torch.randperm(num_blocks).tolist()           # scattered, non-contiguous pages
    tables = torch.zeros(len(lens), max(blocks_per_seq), dtype=torch.int32)
    for i, nb in enumerate(blocks_per_seq):
        tables[i, :nb] = torch.tensor([perm.pop() for _ in range(nb)])
    query_lens = [1] * len(seq_lens) + ([prefill_len] if prefill_len else [])
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.int64), query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32), block_tables=tables, max_query_len=max(query_lens),
        max_seq_len=max(lens), num_decodes=len(seq_lens), query_start_loc_cpu=starts, seq_lens_cpu=lens)
    # q as a strided view of a wider qkv row, the way the model passes it
    qkv = torch.randn(starts[-1], (num_heads + 2 * num_kv_heads) * head_dim).to(dtype)
    q = qkv[:, : num_heads * head_dim].view(starts[-1], num_heads, head_dim)
    return q, k_cache, v_cache, meta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (128, 32), (64, 4)])
@pytest.mark.parametrize("decode_kernel", [False, True], ids=["auto", "decode_kernel"])
def test_paged_decode_attention_matches_reference(dtype, heads, head_dim, block_size, decode_kernel, monkeypatch):
    if decode_kernel:     # bf16 decodes run paged_decode_attention, not 1-token prefill chunks
        monkeypatch.setattr(cpu_ops, "_bf16_dot", False)
    # lengths ending exactly on a block boundary, one past it, a single token, ragged
    lens = [block_size, block_size + 1, 1, 3 * block_size + 7]
    q, k_cache, v_cache, meta = decode_case(dtype, *heads, head_dim, block_size, lens, prefill_len=6)
    scale = head_dim ** -0.5
    got = cpu_ops.paged_attention(q, k_cache, v_cache, meta, scale)
    want = reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, scale)
    torch.testing.assert_close(got.float(), want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def flat_batch(dtype, num_heads, num_kv_heads, head_dim, block_size, seqs, num_decodes, seed=0):
    """Paged caches and metadata for seqs = [(query_len, context_len)], decodes first, pages
    handed out in shuffled order. Every cache slot that belongs to no context (the tail of a
    last block, spare blocks) holds NaN, so reading past a context poisons the output."""
    torch.manual_seed(seed)
    blocks_per_seq = [-(-ctx // block_size) for _, ctx in seqs]
    num_blocks = sum(blocks_per_seq) + 2
    caches = [torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan")) for _ in range(2)]
    perm = torch.randperm(num_blocks).tolist()
    tables = torch.zeros(len(seqs), max(blocks_per_seq) + 1, dtype=torch.int32)
    for i, ((_, ctx), nb) in enumerate(zip(seqs, blocks_per_seq)):
        tables[i, :nb] = torch.tensor([perm.pop() for _ in range(nb)])
        for cache in caches:
            pages = cache[tables[i, :nb].long()].flatten(0, 1)       # [nb * block_size, KVH, D]
            pages[:ctx] = torch.randn(ctx, num_kv_heads, head_dim)
            cache[tables[i, :nb].long()] = pages.view(nb, block_size, num_kv_heads, head_dim)
    starts = [0]
    for query_len, _ in seqs:
        starts.append(starts[-1] + query_len)
    lens = [ctx for _, ctx in seqs]
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.int64), query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32), block_tables=tables, max_query_len=max(q for q, _ in seqs),
        max_seq_len=max(lens), num_decodes=num_decodes, query_start_loc_cpu=starts, seq_lens_cpu=lens)
    qkv = torch.randn(starts[-1], (num_heads + 2 * num_kv_heads) * head_dim)   # q: a strided view, as in the model
    q = qkv.to(dtype)[:, : num_heads * head_dim].view(starts[-1], num_heads, head_dim)
    return q, caches[0].to(dtype), caches[1].to(dtype), meta


def causal_attention(q, k_cache, v_cache, meta, scale):
    """Plain float64 paged causal attention, written out independently of the reference: query
    token i of a chunk of Q tokens in a context of L sees key positions [0, L - Q + i]."""
    num_heads, block_size, num_kv_heads = q.shape[1], k_cache.shape[1], k_cache.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    for s, ctx in enumerate(meta.seq_lens_cpu):
        start, end = meta.query_start_loc_cpu[s], meta.query_start_loc_cpu[s + 1]
        positions = torch.arange(ctx)
        slots = meta.block_tables[s, positions // block_size].long() * block_size + positions % block_size
        keys = k_cache.flatten(0, 1)[slots].double().repeat_interleave(num_heads // num_kv_heads, dim=1)
        values = v_cache.flatten(0, 1)[slots].double().repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].double(), keys) * scale
        limits = torch.arange(end - start) + ctx - (end - start)
        scores.masked_fill_(positions[None, None, :] > limits[None, :, None], float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
    return out


GROUPS = {1: (3, 3), 3: (9, 3), 4: (8, 2)}
# (query_len, context_len): no cached prefix, and chunks after a prefix; lengths on and off the
# 16-token query tile and the 64-key tile, down to a single-token chunk.
PREFILL_CHUNKS = [(1, 1), (2, 2), (5, 5), (17, 17), (64, 64), (200, 200), (1, 50), (5, 37), (17, 100), (34, 60),
                  (64, 65), (200, 333)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_decodes", [0, 3], ids=["prefill_only", "mixed"])
def test_paged_prefill_attention_matches_causal_formula(dtype, head_dim, group, block_size, num_decodes):
    decodes = [(1, 1), (1, block_size + 1), (1, 75)][:num_decodes]
    q, k_cache, v_cache, meta = flat_batch(dtype, *GROUPS[group], head_dim, block_size,
                                           decodes + PREFILL_CHUNKS, num_decodes)
    scale = head_dim ** -0.5
    got = cpu_ops.paged_attention(q, k_cache, v_cache, meta, scale)
    want = causal_attention(q, k_cache, v_cache, meta, scale)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.double(), want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_prefill_attention_matches_reference(dtype):
    q, k_cache, v_cache, meta = flat_batch(dtype, 9, 3, 64, 16, [(1, 40), (30, 30), (23, 90)], 1)
    for cache in (k_cache, v_cache):
        cache.nan_to_num_(0.0)          # the reference gathers whole pages
    got = cpu_ops.paged_attention(q, k_cache, v_cache, meta, 0.125)
    want = reference.paged_attention(q.float(), k_cache.float(), v_cache.float(), meta, 0.125)
    torch.testing.assert_close(got.float(), want, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_paged_prefill_attention_is_causal():
    # Keys after a token's position carry huge values: any leak past the causal limit shows.
    q, k_cache, v_cache, meta = flat_batch(torch.float32, 9, 3, 64, 16, [(40, 40), (20, 57)], 0)
    for s, (start, ctx) in enumerate(zip(meta.query_start_loc_cpu, meta.seq_lens_cpu)):
        query_len = meta.query_start_loc_cpu[s + 1] - start
        want = causal_attention(q, k_cache, v_cache, meta, 0.125)[start:start + query_len]
        positions = torch.arange(ctx)
        slots = meta.block_tables[s, positions // 16].long() * 16 + positions % 16
        for i in range(query_len):     # poison every key after token i, then check token i
            poisoned = v_cache.clone()
            future = slots[ctx - query_len + i + 1:]
            poisoned.view(-1, 3, 64)[future] = 1e6
            got = cpu_ops.paged_attention(q, k_cache, poisoned, meta, 0.125)
            torch.testing.assert_close(got[start + i].double(), want[i], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, with_residual):
    torch.manual_seed(1)
    x, residual = torch.randn(7, 576).to(dtype), torch.randn(7, 576).to(dtype)
    weight = (torch.rand(576) + 0.5).to(dtype)
    if with_residual:
        want, want_sum = reference.fused_add_rms_norm(x, residual.clone(), weight, 1e-5)
        got, got_sum = cpu_ops.fused_add_rms_norm(x, residual, weight, 1e-5)
        torch.testing.assert_close(got_sum, want_sum)
        assert got_sum.data_ptr() == residual.data_ptr(), "the sum is written into residual in place"
    else:
        want, got = reference.rms_norm(x, weight, 1e-5), cpu_ops.rms_norm(x, weight, 1e-5)
    torch.testing.assert_close(got.float(), want.float(), atol=TOLERANCE[dtype] * 4, rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("adjacent", [True, False])
def test_rotary_matches_reference(dtype, adjacent):
    torch.manual_seed(2)
    heads, kv_heads, dim, tokens = 9, 3, 64, 5
    cache = reference.build_cos_sin_cache(dim, 128, 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))
    positions = torch.tensor([0, 3, 17, 64, 127])
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype)
    if adjacent:
        q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    else:
        q, k = qkv[:, : heads * dim].clone(), qkv[:, -kv_heads * dim:].clone()
    q, k = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)
    want_q, want_k = reference.rotary_embedding(positions, q.float().clone(), k.float().clone(), cache)
    before_v = qkv[:, -kv_heads * dim:].clone()
    cpu_ops.rotary_embedding(positions, q, k, cache)
    torch.testing.assert_close(q.float(), want_q, atol=TOLERANCE[dtype] * 4, rtol=TOLERANCE[dtype])
    torch.testing.assert_close(k.float(), want_k, atol=TOLERANCE[dtype] * 4, rtol=TOLERANCE[dtype])
    if adjacent:
        assert torch.equal(qkv[:, -kv_heads * dim:], before_v), "v must be untouched"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_reference(dtype):
    x = torch.randn(6, 2 * 1536).to(dtype)
    torch.testing.assert_close(cpu_ops.silu_and_mul(x).float(), reference.silu_and_mul(x).float(),
                               atol=TOLERANCE[dtype] * 4, rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_matches_reference_and_skips_padding(dtype):
    torch.manual_seed(3)
    kv_heads, dim, tokens = 3, 64, 6
    qkv = torch.randn(tokens, (9 + 2 * kv_heads) * dim).to(dtype)
    _, key, value = qkv.split([9 * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    key, value = key.view(tokens, kv_heads, dim), value.view(tokens, kv_heads, dim)
    slots = torch.tensor([5, -1, 0, 17, -1, 31])
    caches = [torch.full((4, 8, kv_heads, dim), 7.0, dtype=dtype) for _ in range(4)]
    reference.store_kv(key, value, caches[0], caches[1], slots)
    cpu_ops.store_kv(key, value, caches[2], caches[3], slots)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[[5, 0, 17, 31]] = False
    assert bool((caches[2].view(32, -1)[untouched] == 7.0).all()), "padding slots must not be written"


DECODE_GROUPS = {1: (3, 3), 3: (9, 3), 4: (8, 2), 8: (8, 1)}
DECODE_LENS = [1, 5, 16, 17, 300]


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("prefill", [False, True], ids=["decodes", "mixed"])
def test_bf16_decode_kernel_matches_formula(head_dim, group, block_size, prefill):
    """bf16 decodes (paged_decode_attention_bf16 where AVX512-BF16 is there, else the fallbacks),
    alone and ahead of prefill chunks, against the float64 formula, NaN past every context."""
    decodes = [(1, n) for n in DECODE_LENS + [33, 64, 2]]
    chunks = [(5, 5), (17, 40), (1, 20)] if prefill else []
    q, k_cache, v_cache, meta = flat_batch(torch.bfloat16, *DECODE_GROUPS[group], head_dim, block_size,
                                           decodes + chunks, len(decodes), seed=group)
    scale = head_dim ** -0.5
    got = cpu_ops.paged_attention(q, k_cache, v_cache, meta, scale)
    want = causal_attention(q, k_cache, v_cache, meta, scale)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    torch.testing.assert_close(got.double(), want, atol=TOLERANCE[torch.bfloat16], rtol=TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 3, 8])
def test_bf16_decode_kernel_direct(head_dim, group):
    """The C kernel itself (where built with AVX512-BF16): every decode row written, equal to the formula."""
    lib = cpu_ops.library()
    decodes = [(1, n) for n in DECODE_LENS]
    q, k_cache, v_cache, meta = flat_batch(torch.bfloat16, *DECODE_GROUPS[group], head_dim, 16, decodes, len(decodes))
    scale = head_dim ** -0.5
    out = torch.full(q.shape, float("nan"), dtype=torch.bfloat16)
    tables, lens = meta.block_tables.contiguous(), meta.seq_lens.contiguous()
    rc = lib.paged_decode_attention_bf16(
        cpu_ops._ptr(q), cpu_ops._i(q.stride(0)), cpu_ops._ptr(k_cache), cpu_ops._ptr(v_cache), cpu_ops._ptr(tables),
        cpu_ops._i(tables.shape[1]), cpu_ops._ptr(lens), cpu_ops._ptr(out), cpu_ops._i(len(decodes)),
        cpu_ops._i(q.shape[1]), cpu_ops._i(k_cache.shape[2]), cpu_ops._i(head_dim), cpu_ops._i(16),
        ctypes.c_float(scale))
    if rc != 0:
        pytest.skip("no AVX512-BF16: paged_decode_attention_bf16 is a stub")
    want = causal_attention(q, k_cache, v_cache, meta, scale)
    torch.testing.assert_close(out.double(), want, atol=TOLERANCE[torch.bfloat16], rtol=TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("heads", [(20, 5), (32, 8), (16, 16)], ids=["uneven_runs", "two_runs", "sixteen_kv"])
def test_bf16_decode_kernel_splits_wide_models_into_runs_of_kv_heads(heads):
    """Enough sequences for a task per sequence, but more than 16 query heads: a task takes a
    run of kv heads (the last run shorter where they do not divide), and every head is written."""
    decodes = [(1, n) for n in [300, 17, 1, 64, 33, 5, 16, 2, 90, 129]]
    q, k_cache, v_cache, meta = flat_batch(torch.bfloat16, *heads, 64, 16, decodes, len(decodes), seed=3)
    scale = 64 ** -0.5
    got = cpu_ops.paged_attention(q, k_cache, v_cache, meta, scale)
    want = causal_attention(q, k_cache, v_cache, meta, scale)
    torch.testing.assert_close(got.double(), want, atol=TOLERANCE[torch.bfloat16], rtol=TOLERANCE[torch.bfloat16])
