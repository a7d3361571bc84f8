"""Torch implementations of every kernel. They define the semantics the Triton kernels
are tested against, and they are the CPU path, so they are batched, not per-token loops.

KV cache layout, per layer: k_cache, v_cache of shape [num_blocks, block_size, num_kv_heads, head_dim].
Slot s lives at block s // block_size, offset s % block_size."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gateway.kernels.metadata import AttentionMetadata


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
             v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value [T, KVH, D] into the paged caches at slot_mapping [T]; -1 slots are skipped."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value.to(v_cache.dtype))


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """[num_seqs, max_blocks] block ids → [num_seqs, length, KVH, D] contiguous context."""
    num_blocks_needed = -(-length // cache.shape[1])
    blocks = cache[block_table[:, :num_blocks_needed]]           # [S, nb, BS, KVH, D]
    return blocks.flatten(1, 2)[:, :length]


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, max_len: int,
                      scale: float) -> torch.Tensor:
    """q [S, H, D], one query per sequence, attending to its whole context."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    keys = _gather_context(k_cache, block_tables, max_len)        # [S, L, KVH, D]
    values = _gather_context(v_cache, block_tables, max_len)
    qg = q.view(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.matmul(qg, keys.permute(0, 2, 3, 1)).float() * scale   # [S, KVH, G, L]
    positions = torch.arange(max_len, device=q.device)
    padding = positions[None, :] >= seq_lens[:, None].to(positions.dtype)  # [S, L]
    scores.masked_fill_(padding[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    out = torch.matmul(probs, values.permute(0, 2, 1, 3))         # [S, KVH, G, D]
    return out.reshape(num_seqs, num_heads, head_dim)


PREFILL_QUERY_TILE = 128   # query rows per score matrix: bounds its memory at long prompts


def _prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       block_table: torch.Tensor, context_len: int, scale: float) -> torch.Tensor:
    """q [Q, H, D]: the last Q tokens of a context of context_len tokens, causal.
    Plain matmuls over query tiles, the query heads grouped per KV head (no K/V repeat): on CPU
    this is 3-4x faster than SDPA, whose GQA and masked cases fall back to its math path."""
    query_len, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    keys = _gather_context(k_cache, block_table[None], context_len)[0].to(q.dtype)   # [L, KVH, D]
    values = _gather_context(v_cache, block_table[None], context_len)[0].to(q.dtype)
    k_t = keys.permute(1, 2, 0)[:, None]                       # [KVH, 1, D, L]
    v_t = values.transpose(0, 1)[:, None]                      # [KVH, 1, L, D]
    qg = q.view(query_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)   # [KVH, G, Q, D]
    out = torch.empty(num_kv_heads, group, query_len, head_dim, dtype=q.dtype, device=q.device)
    offset = context_len - query_len
    for start in range(0, query_len, PREFILL_QUERY_TILE):
        end = min(query_len, start + PREFILL_QUERY_TILE)
        visible = offset + end                                 # keys the tile's last row sees
        scores = torch.matmul(qg[:, :, start:end], k_t[..., :visible]).float() * scale
        q_pos = torch.arange(start + offset, end + offset, device=q.device)[:, None]
        scores.masked_fill_(torch.arange(visible, device=q.device)[None, :] > q_pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out[:, :, start:end] = torch.matmul(probs, v_t[:, :, :visible])
    return out.permute(2, 0, 1, 3).reshape(query_len, num_heads, head_dim)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, H, D] for the flat batch → [T, H, D]. Decodes batched, prefill chunks one by one."""
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        max_len = max(meta.seq_lens_cpu[:nd])
        out[:nd] = _decode_attention(q[:nd], k_cache, v_cache, meta.block_tables[:nd],
                                     meta.seq_lens[:nd], max_len, scale)
    prefill_attention_into(out, q, k_cache, v_cache, meta, scale)
    return out


def prefill_attention_into(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> None:
    """Fill `out` for the prefill chunks (sequences after the decodes), one sequence at a time."""
    for i in range(meta.num_decodes, meta.num_seqs):
        start, end = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
        out[start:end] = _prefill_attention(q[start:end], k_cache, v_cache,
                                            meta.block_tables[i], meta.seq_lens_cpu[i], scale)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(variance + eps)).to(x.dtype) * weight


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual)."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] = [gate | up] → silu(gate) * up, [T, I]."""
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary, in place. q [T, H, D], k [T, KVH, D]; cos_sin_cache [max_pos, D] = [cos | sin]."""
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)          # [T, D/2] each
    cos, sin = cos[:, None, :], sin[:, None, :]
    for x in (q, k):
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        x.copy_(rotated)
    return q, k


def build_cos_sin_cache(head_dim: int, max_position: int, inv_freq: torch.Tensor,
                        attention_scaling: float = 1.0) -> torch.Tensor:
    """[max_position, head_dim] float32 = [cos | sin] for inv_freq [head_dim/2]."""
    t = torch.arange(max_position, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.to(t.device, torch.float32))   # t is on the ambient device
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention_scaling
