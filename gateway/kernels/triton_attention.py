"""Triton paged attention over the cache layout [num_blocks, block_size, num_kv_heads, head_dim].

Owns three kernels and their launch configs:
  _prefill_kernel  varlen causal attention: each prefill sequence's query chunk (the LAST
                   query_len tokens of its context) attends to its cached prefix plus itself.
  _decode_kernel   split-K (flash-decoding) attention for the first num_decodes sequences, one
                   query each; every program covers one (sequence, kv head, split) and all the
                   query heads of that kv head, so each K/V tile is read once per GQA group.
  _reduce_kernel   merges the per-split partial outputs by their log-sum-exp.
Side effects, in order: decode_attention writes out[:num_decodes] (through fp32 scratch when
split), prefill_attention writes the prefill rows of out. Nothing else is written.

Numerics: dot operands stay in the storage dtype on GPU (tensor cores) with fp32
accumulation; softmax runs in fp32 in the log2 domain. Under TRITON_INTERPRET the operands
are widened to fp32 right after tl.load, because the interpreter computes bf16 dots wrongly.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once, at the moment the kernels below are decorated: that is what decides whether they
# run interpreted, so the operand dtype must follow the same value.
# (triton.knobs appeared in 3.4; older releases read the variable directly.)
_knobs = getattr(triton, "knobs", None)
INTERPRET = bool(_knobs.runtime.interpret) if _knobs else os.environ.get("TRITON_INTERPRET") == "1"

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
LOG2E = 1.4426950408889634
MAX_SPLITS = 16
MIN_SPLIT_TOKENS = 256      # below this a split's fixed cost outweighs the parallelism it adds
TARGET_PROGRAMS = 264       # ~2 waves on an H100 (132 SMs): enough to hide one straggler


@triton.jit
def _attend_tile(acc, m_i, l_i, q, q_pos, k_cache, v_cache, table_row, start, kv_end, head_off,
                 stride_kb, stride_kt, qk_scale, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                 OP_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step over context tokens [start, start + BLOCK_N) of a paged sequence."""
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    n_valid = offs_n < kv_end
    d_valid = offs_d < HEAD_DIM
    # Per-token gather through the block table: works for any BLOCK_N / BLOCK_SIZE ratio.
    block_ids = tl.load(table_row + offs_n // BLOCK_SIZE, mask=n_valid, other=0).to(tl.int64)
    token_off = block_ids * stride_kb + (offs_n % BLOCK_SIZE) * stride_kt + head_off
    kv_mask_t = n_valid[None, :] & d_valid[:, None]
    k = tl.load(k_cache + token_off[None, :] + offs_d[:, None], mask=kv_mask_t, other=0.0)
    s = tl.dot(q, k.to(OP_DTYPE), input_precision=PRECISION) * qk_scale
    visible = n_valid[None, :]
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= q_pos[:, None])
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key yet keeps m = -inf; shift by 0 to avoid inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    kv_mask = n_valid[:, None] & d_valid[None, :]
    v = tl.load(v_cache + token_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(OP_DTYPE), v.to(OP_DTYPE), input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(q_ptr, k_cache, v_cache, out_ptr, block_tables, query_start_loc, seq_lens,
                    qk_scale, seq_offset, stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_kb, stride_kt, stride_kh, stride_bt,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                    HEAD_DIM_PAD: tl.constexpr, OP_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """grid (num_prefills, cdiv(max_query_len, BLOCK_Q), num_kv_heads). Row r of the tile is
    query token tile_start + r // GROUP, query head kv_head * GROUP + r % GROUP."""
    seq = tl.program_id(0) + seq_offset
    tile_start = tl.program_id(1) * BLOCK_Q
    kv_head = tl.program_id(2)
    q_begin = tl.load(query_start_loc + seq)
    q_len = tl.load(query_start_loc + seq + 1) - q_begin
    if tile_start >= q_len:
        return
    prefix_len = tl.load(seq_lens + seq) - q_len
    rows = tl.arange(0, BLOCK_M)
    tok = tile_start + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    io_mask = row_valid[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_off = (q_begin + tok)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=io_mask, other=0.0).to(OP_DTYPE)
    q_pos = prefix_len + tok
    # The tile's last query sees up to its own position; nothing later is ever loaded.
    kv_end = prefix_len + tl.minimum(tile_start + BLOCK_Q, q_len)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    table_row = block_tables + seq.to(tl.int64) * stride_bt
    for start in range(0, kv_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, q_pos, k_cache, v_cache, table_row, start,
                                     kv_end, kv_head * stride_kh, stride_kb, stride_kt, qk_scale,
                                     True, BLOCK_N, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD,
                                     OP_DTYPE, PRECISION)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_off = (q_begin + tok)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptr + o_off, out, mask=io_mask)


@triton.jit
def _decode_kernel(q_ptr, k_cache, v_cache, out_ptr, part_out, part_lse, block_tables, seq_lens,
                   qk_scale, num_splits, stride_qt, stride_qh, stride_ot, stride_oh,
                   stride_kb, stride_kt, stride_kh, stride_bt,
                   GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                   OP_DTYPE: tl.constexpr, PRECISION: tl.constexpr, DIRECT: tl.constexpr):
    """grid (num_decodes, num_kv_heads, num_splits). Query rows are padded to GROUP_PAD >= 16
    because tl.dot needs M >= 16 on older Triton; padded rows are zeros and never stored."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx_len = tl.load(seq_lens + seq)
    # Each sequence divides its own context evenly; splits past its end run zero iterations.
    split_len = tl.cdiv(tl.cdiv(ctx_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, ctx_len)
    rows = tl.arange(0, GROUP_PAD)
    head = kv_head * GROUP + rows
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    io_mask = (rows < GROUP)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q_off = seq * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=io_mask, other=0.0).to(OP_DTYPE)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    table_row = block_tables + seq.to(tl.int64) * stride_bt
    for start in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, rows, k_cache, v_cache, table_row, start,
                                     hi, kv_head * stride_kh, stride_kb, stride_kt, qk_scale,
                                     False, BLOCK_N, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD,
                                     OP_DTYPE, PRECISION)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if DIRECT:
        o_off = seq * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptr + o_off, out, mask=io_mask)
    else:
        num_heads = tl.num_programs(1) * GROUP
        part = (seq * num_heads + head) * num_splits + split             # [GROUP_PAD]
        tl.store(part_out + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=io_mask)
        # An empty split (past the end of a short context) gets weight 0 in the reduction.
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(part_lse + part, lse, mask=rows < GROUP)


@triton.jit
def _reduce_kernel(part_out, part_lse, out_ptr, num_splits, stride_ot, stride_oh,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """grid (num_decodes, num_heads): out = sum_s w_s * part_s with w_s ∝ 2^lse_s."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    s_valid = splits < num_splits
    base = (seq * tl.num_programs(1) + head) * num_splits
    lse = tl.load(part_lse + base + splits, mask=s_valid, other=float("-inf"))
    m = tl.max(lse, 0)
    weight = tl.math.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    total = tl.sum(weight, 0)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    mask = s_valid[:, None] & d_valid[None, :]
    parts = tl.load(part_out + (base + splits)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=mask, other=0.0)
    out = tl.sum(weight[:, None] * parts, 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + offs_d, out, mask=d_valid)


def common_config(dtype: torch.dtype, head_dim: int, block_size: int, interpret: bool = INTERPRET) -> dict:
    """Constexprs shared by the prefill and decode kernels."""
    wide = dtype == torch.float32 or interpret
    return dict(BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
                HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
                OP_DTYPE=tl.float32 if wide else TL_DTYPES[dtype],
                # fp32 caches are a debugging mode: keep them exact rather than TF32.
                PRECISION="ieee" if dtype == torch.float32 else "tf32")


def prefill_config(dtype: torch.dtype, head_dim: int, block_size: int, group: int,
                   interpret: bool = INTERPRET) -> tuple[dict, dict]:
    """(constexprs, launch options). fp32 tiles are halved to fit A100 shared memory."""
    block_m = max(64, triton.next_power_of_2(group))
    fp32 = dtype == torch.float32
    meta = dict(common_config(dtype, head_dim, block_size, interpret), GROUP=group,
                BLOCK_M=block_m, BLOCK_Q=block_m // group, BLOCK_N=32 if fp32 else 64)
    return meta, dict(num_warps=4, num_stages=2 if fp32 else 3)


def decode_config(dtype: torch.dtype, head_dim: int, block_size: int, group: int, direct: bool,
                  interpret: bool = INTERPRET) -> tuple[dict, dict]:
    meta = dict(common_config(dtype, head_dim, block_size, interpret), GROUP=group,
                GROUP_PAD=max(16, triton.next_power_of_2(group)),
                BLOCK_N=32 if dtype == torch.float32 else 64, DIRECT=direct)
    return meta, dict(num_warps=4, num_stages=2)


def choose_num_splits(num_decodes: int, num_kv_heads: int, max_len: int) -> int:
    """Split only as far as needed to fill the GPU, and never below MIN_SPLIT_TOKENS a split."""
    wanted = triton.cdiv(TARGET_PROGRAMS, max(1, num_decodes * num_kv_heads))
    return max(1, min(wanted, triton.cdiv(max_len, MIN_SPLIT_TOKENS), MAX_SPLITS))


def _cache_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1, "cache strides"
    return k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)


def prefill_attention(q, k_cache, v_cache, out, meta, scale: float) -> None:
    """Writes out rows of sequences [num_decodes, num_seqs)."""
    num_prefills = meta.num_seqs - meta.num_decodes
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    group = q.shape[1] // num_kv_heads
    consts, opts = prefill_config(q.dtype, head_dim, k_cache.shape[1], group)
    grid = (num_prefills, triton.cdiv(meta.max_query_len, consts["BLOCK_Q"]), num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, meta.block_tables, meta.query_start_loc, meta.seq_lens,
        scale * LOG2E, meta.num_decodes, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *_cache_strides(k_cache, v_cache), meta.block_tables.stride(0), **consts, **opts)


def decode_attention(q, k_cache, v_cache, out, meta, scale: float, num_splits: int | None = None) -> None:
    """Writes out[:num_decodes]. The split count: num_splits (tests force it), else
    meta.decode_splits (fixed by CUDA graphs), else choose_num_splits on the host lengths."""
    nd = meta.num_decodes
    num_heads = q.shape[1]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    num_splits = num_splits or meta.decode_splits
    if num_splits is None:
        num_splits = choose_num_splits(nd, num_kv_heads, max(meta.seq_lens_cpu[:nd]))
    consts, opts = decode_config(q.dtype, head_dim, k_cache.shape[1], num_heads // num_kv_heads,
                                 direct=num_splits == 1)
    part_out = part_lse = out    # unused placeholders when DIRECT
    if num_splits > 1:
        part_out = torch.empty((nd, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((nd, num_heads, num_splits), dtype=torch.float32, device=q.device)
    _decode_kernel[(nd, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_out, part_lse, meta.block_tables, meta.seq_lens,
        scale * LOG2E, num_splits, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        *_cache_strides(k_cache, v_cache), meta.block_tables.stride(0), **consts, **opts)
    if num_splits > 1:
        _reduce_kernel[(nd, num_heads)](
            part_out, part_lse, out, num_splits, out.stride(0), out.stride(1), HEAD_DIM=head_dim,
            HEAD_DIM_PAD=consts["HEAD_DIM_PAD"], SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=4)
