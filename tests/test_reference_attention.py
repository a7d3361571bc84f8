"""The torch prefill attention (reference._prefill_attention: query tiles, heads grouped per KV
head) against a naive fp32 formula: K/V repeated per query head, an explicit bottom-right
causal mask, one softmax over the whole row."""

import pytest
import torch

from gateway.kernels import reference


def naive_causal_attention(q, keys, values, scale):
    """q [Q, H, D], keys/values [L, KVH, D] → [Q, H, D] in fp32; query i sees keys ≤ L - Q + i."""
    query_len, num_heads, _ = q.shape
    context_len, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    k = keys.float().repeat_interleave(group, dim=1).transpose(0, 1)      # [H, L, D]
    v = values.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = q.float().transpose(0, 1) @ k.transpose(1, 2) * scale         # [H, Q, L]
    visible = torch.arange(context_len)[None, :] <= torch.arange(query_len)[:, None] + context_len - query_len
    scores = scores.masked_fill(~visible, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(0, 1)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("query_len,context_len", [(1, 1), (5, 5), (128, 128), (300, 300), (200, 450), (1, 77)])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(9, 3), (4, 4)])
def test_prefill_attention_matches_naive_formula(dtype, tol, query_len, context_len, num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(query_len * 1000 + context_len)
    head_dim, block_size = 64, 16
    num_blocks = -(-context_len // block_size)
    k_cache = torch.randn(num_blocks + 3, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks + 3, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    block_table = torch.randperm(num_blocks + 3, generator=gen)[:num_blocks].to(torch.int32)   # scattered blocks
    q = torch.randn(query_len, num_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim ** -0.5
    out = reference._prefill_attention(q, k_cache, v_cache, block_table, context_len, scale)
    keys = k_cache[block_table.long()].flatten(0, 1)[:context_len]
    values = v_cache[block_table.long()].flatten(0, 1)[:context_len]
    expected = naive_causal_attention(q, keys, values, scale)
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)
