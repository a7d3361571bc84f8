"""Triton per-token kernels: store_kv (KV cache write by slot mapping), silu_and_mul (SwiGLU
on the merged gate|up tensor) and neox rotary embedding (in place on q and k).

Side effects: store_kv writes only the cache slots named by non-negative slot_mapping
entries; rotary writes q and k in place (q before k within each token's program);
silu_and_mul writes only its freshly allocated output. All math is fp32, converted right
after tl.load; stores round to the destination dtype."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(key_ptr, value_ptr, k_cache, v_cache, slot_ptr, stride_kt, stride_kh,
                     stride_vt, stride_vh, stride_cb, stride_ct, stride_ch, block_size,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr):
    """grid (num_tokens,): copy one token's [KVH, D] key and value into its cache slot."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:        # padding token (CUDA-graph batch padding): nothing to store
        return
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, DIM_PAD)[None, :]
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
    dst = (slot // block_size) * stride_cb + (slot % block_size) * stride_ct + heads * stride_ch + dims
    key = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask).to(tl.float32)
    tl.store(k_cache + dst, key, mask=mask)
    value = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask).to(tl.float32)
    tl.store(v_cache + dst, value, mask=mask)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    """grid (rows, cdiv(I, BLOCK)): out = silu(x[:, :I]) * x[:, I:]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, gate * tl.sigmoid(gate) * up, mask=mask)


@triton.jit
def _rotate_heads(base, stride_h, cos, sin, NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr,
                  HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """Neox rotation of one token's heads: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HALF)
    first = base + heads * stride_h + dims
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, x1 * cos - x2 * sin, mask=mask)
    tl.store(first + HALF, x2 * cos + x1 * sin, mask=mask)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cache_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_c, NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr,
                   Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr,
                   HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """grid (num_tokens,): cos/sin are read once per token and applied to all q and k heads."""
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    row = cache_ptr + pos * stride_c + dims
    cos = tl.load(row, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(row + HALF, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, Q_HEADS_PAD, HALF, HALF_PAD)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, cos, sin, NUM_K_HEADS, K_HEADS_PAD, HALF, HALF_PAD)


def store_kv_config(num_kv_heads: int, head_dim: int) -> tuple[dict, dict]:
    return dict(NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
                HEADS_PAD=triton.next_power_of_2(num_kv_heads),
                DIM_PAD=triton.next_power_of_2(head_dim)), dict(num_warps=4)


def silu_config(inter: int) -> tuple[dict, dict]:
    block = min(1024, triton.next_power_of_2(inter))
    return dict(BLOCK=block), dict(num_warps=4)


def rotary_config(num_heads: int, num_kv_heads: int, head_dim: int) -> tuple[dict, dict]:
    half = head_dim // 2
    return dict(NUM_Q_HEADS=num_heads, NUM_K_HEADS=num_kv_heads,
                Q_HEADS_PAD=triton.next_power_of_2(num_heads),
                K_HEADS_PAD=triton.next_power_of_2(num_kv_heads),
                HALF=half, HALF_PAD=triton.next_power_of_2(half)), dict(num_warps=4)


def launch_store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape and k_cache.shape[2:] == (num_kv_heads, head_dim)
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    assert key.stride(-1) == 1 and value.stride(-1) == 1 and slot_mapping.shape == (num_tokens,)
    if num_tokens == 0:
        return
    consts, opts = store_kv_config(num_kv_heads, head_dim)
    _store_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, key.stride(0), key.stride(1), value.stride(0),
        value.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.shape[1],
        **consts, **opts)


def launch_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    inter = x.shape[-1] // 2
    rows = x.reshape(-1, x.shape[-1])
    assert rows.stride(-1) == 1
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    if rows.shape[0] == 0 or inter == 0:
        return out
    consts, opts = silu_config(inter)
    grid = (rows.shape[0], triton.cdiv(inter, consts["BLOCK"]))
    _silu_and_mul_kernel[grid](rows, out, rows.stride(0), inter, inter, **consts, **opts)
    return out


def launch_rotary(positions, q, k, cos_sin_cache) -> None:
    num_tokens, num_heads, head_dim = q.shape
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim and positions.shape == (num_tokens,)
    assert cos_sin_cache.shape[1] == head_dim and head_dim % 2 == 0, "rotary covers the whole head"
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    if num_tokens == 0:
        return
    consts, opts = rotary_config(num_heads, k.shape[1], head_dim)
    _rotary_kernel[(num_tokens,)](positions, q, k, cos_sin_cache, q.stride(0), q.stride(1),
                                  k.stride(0), k.stride(1), cos_sin_cache.stride(0), **consts, **opts)
