"""CPU kernels in C (cpu/*.c beside this module), with the reference signatures.

On first use the C files are compiled into one library with the system C compiler (-O3 -march=native -fopenmp)
into the temp directory, keyed by a hash of the sources and flags, and loaded with ctypes; it
links the libgomp that torch has already loaded, so both share one thread pool.
paged_attention runs the whole flat batch in C: paged_prefill_attention (tiles of 16 query
tokens x kv head, causal, online softmax, reading the paged cache in place) for the prefill
chunks, and paged_decode_attention for the decodes, except where bf16 runs on vdpbf16ps
(AVX512-BF16): there the decodes run paged_decode_attention_bf16 (decode_bf16.c: lanes over
keys, head dims 64/128, group <= 8), else 1-token chunks of the prefill call. Anything the
C code does not cover (head dims other than 64/128/256, dtypes other than fp32/bf16, no
compiler) runs the torch reference instead, so results never depend on whether the build
succeeded."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from gateway.kernels import reference
from gateway.kernels.metadata import AttentionMetadata

log = logging.getLogger("gateway.kernels")

_SOURCE_DIR = Path(__file__).with_name("cpu")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-fno-math-errno"]
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_MAX_HEAD_DIM, _MAX_GROUP, _MAX_BLOCK, _MAX_HIDDEN, _MAX_INTER = 256, 32, 128, 8192, 16384
_lib = None
_load_failed = False
_bf16_dot: bool | None = None    # the library's prefill_bf16_dot(), asked once


def _build() -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler found: CPU kernels fall back to torch")
        return None
    sources = sorted(_SOURCE_DIR.glob("*.c"))
    text = b"".join(path.read_bytes() for path in sorted(_SOURCE_DIR.glob("*.[ch]")))
    digest = hashlib.sha256(text + " ".join(_FLAGS).encode()).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / f"gateway-cpu-kernels-{digest}-{os.getuid()}.so"
    if not target.exists():
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        result = subprocess.run([compiler, *_FLAGS, *map(str, sources), "-o", str(partial), "-lm"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            log.warning("CPU kernels failed to compile, falling back to torch:\n%s", result.stderr[-2000:])
            return None
        partial.replace(target)
    return ctypes.CDLL(str(target))


def library() -> ctypes.CDLL | None:
    global _lib, _load_failed
    if _lib is None and not _load_failed:
        try:
            _lib = _build()
        except OSError as exc:
            log.warning("CPU kernels unavailable (%s): falling back to torch", exc)
        _load_failed = _lib is None
    return _lib


def available() -> bool:
    return library() is not None


def _ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)


def _i(v: int) -> ctypes.c_int64:
    return ctypes.c_int64(v)


def _dtype(*tensors: torch.Tensor) -> int | None:
    dtypes = {t.dtype for t in tensors}
    return _DTYPE_CODES.get(dtypes.pop()) if len(dtypes) == 1 else None


def _rows_ok(x: torch.Tensor) -> bool:
    """Each token's [heads, head_dim] block is contiguous (the token stride may be wider)."""
    return x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]


def store_kv(key, value, k_cache, v_cache, slot_mapping) -> None:
    lib = library()
    if (lib is None or key.dtype != k_cache.dtype or value.dtype != v_cache.dtype or key.stride(0) != value.stride(0)
            or not (_rows_ok(key) and _rows_ok(value) and k_cache.is_contiguous() and v_cache.is_contiguous())
            or slot_mapping.dtype != torch.int64 or not slot_mapping.is_contiguous()):
        return reference.store_kv(key, value, k_cache, v_cache, slot_mapping)
    lib.store_kv(_ptr(key), _ptr(value), _i(key.stride(0)), _ptr(k_cache), _ptr(v_cache), _ptr(slot_mapping),
                 _i(key.shape[0]), _i(key.shape[1] * key.shape[2]), _i(key.element_size()))


def _attention_ok(q, k_cache, v_cache) -> bool:
    """What both C attention kernels need (the decode kernel also bounds group and block size)."""
    return (_rows_ok(q) and k_cache.is_contiguous() and v_cache.is_contiguous()
            and q.shape[-1] in (64, 128, 256) and q.shape[1] % k_cache.shape[2] == 0
            and _dtype(q, k_cache, v_cache) is not None)


def _int32(t: torch.Tensor, host: list[int]) -> torch.Tensor:
    """The metadata tensor if it is a contiguous int32 CPU tensor, else one built from the host list."""
    if t.dtype == torch.int32 and t.is_contiguous() and not t.is_cuda:
        return t
    return torch.tensor(host, dtype=torch.int32)


def _tables(meta: AttentionMetadata) -> torch.Tensor:
    return meta.block_tables.to(torch.int32).contiguous()     # no copy when it already is


def _shape_args(q, k_cache, scale) -> tuple:
    return (_i(q.shape[1]), _i(k_cache.shape[2]), _i(q.shape[2]), _i(k_cache.shape[1]), ctypes.c_float(scale),
            ctypes.c_int(_dtype(q)))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Decodes with paged_decode_attention, prefill chunks with paged_prefill_attention; with
    bf16 dot products (AVX512-BF16) the decodes run paged_decode_attention_bf16, or where that
    returns -1 (head dim 256, group > 8), the prefill kernel as 1-token chunks."""
    lib, nd = library(), meta.num_decodes
    group = q.shape[1] // k_cache.shape[2]
    if lib is None or not _attention_ok(q, k_cache, v_cache):
        return reference.paged_attention(q, k_cache, v_cache, meta, scale)
    global _bf16_dot
    if _bf16_dot is None:
        _bf16_dot = lib.prefill_bf16_dot() == 1
    bf16_lanes = _bf16_dot and _dtype(q) == 1       # bf16 kernels built with vdpbf16ps
    if nd and not bf16_lanes and (group > _MAX_GROUP or k_cache.shape[1] > _MAX_BLOCK):
        return reference.paged_attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty(q.shape, dtype=q.dtype)
    decoded = nd > 0 and _decodes_into(lib, out, q, k_cache, v_cache, meta, scale, bf16_lanes)
    if _chunks_into(lib, out, q, k_cache, v_cache, meta, scale, nd if decoded else 0) != 0:
        if not decoded:
            return reference.paged_attention(q, k_cache, v_cache, meta, scale)
        reference.prefill_attention_into(out, q, k_cache, v_cache, meta, scale)
    return out


def _decodes_into(lib, out, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, bf16_lanes: bool) -> bool:
    """Decode rows [0, num_decodes) into out with paged_decode_attention_bf16 (bf16_lanes: keys
    in vector lanes) or paged_decode_attention; False where the kernel does not cover the shape."""
    tables, seq_lens = _tables(meta), _int32(meta.seq_lens, meta.seq_lens_cpu)   # alive across the call
    rows = (_ptr(q), _i(q.stride(0)), _ptr(k_cache), _ptr(v_cache), _ptr(tables), _i(tables.shape[1]),
            _ptr(seq_lens), _ptr(out), _i(meta.num_decodes))
    shape = _shape_args(q, k_cache, scale)
    if bf16_lanes:   # bf16 only: no dtype code
        return lib.paged_decode_attention_bf16(*rows, *shape[:-1]) == 0
    return lib.paged_decode_attention(*rows, *shape) == 0


def prefill_attention_into(out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> None:
    """Like the reference: fill `out` [T, H, D] for the prefill chunks (sequences after the
    decodes), here all chunks in one paged_prefill_attention call (tasks of 16 query tokens x
    kv head, run in parallel)."""
    lib = library()
    if (lib is None or not _attention_ok(q, k_cache, v_cache) or out.dtype != q.dtype
            or not out.is_contiguous() or out.shape != q.shape
            or _chunks_into(lib, out, q, k_cache, v_cache, meta, scale, meta.num_decodes) != 0):
        reference.prefill_attention_into(out, q, k_cache, v_cache, meta, scale)


def _chunks_into(lib, out, q, k_cache, v_cache, meta: AttentionMetadata, scale: float, first_seq: int) -> int:
    """paged_prefill_attention for sequences [first_seq, num_seqs); nonzero: out is incomplete."""
    if first_seq >= meta.num_seqs:
        return 0
    tables, seq_lens = _tables(meta), _int32(meta.seq_lens, meta.seq_lens_cpu)       # alive across the call
    starts = _int32(meta.query_start_loc, meta.query_start_loc_cpu)
    return lib.paged_prefill_attention(
        _ptr(q), _i(q.stride(0)), _ptr(k_cache), _ptr(v_cache), _ptr(tables), _i(tables.shape[1]),
        _ptr(seq_lens), _ptr(starts), _ptr(out), _i(first_seq), _i(meta.num_seqs),
        *_shape_args(q, k_cache, scale))


def _norm(x, residual, weight, eps):
    lib = library()
    code = _dtype(x, weight) if residual is None else _dtype(x, weight, residual)
    if (lib is None or code is None or x.shape[-1] > _MAX_HIDDEN or not x.is_contiguous()
            or (residual is not None and not residual.is_contiguous())):
        return None
    out = torch.empty_like(x)
    lib.add_rms_norm(_ptr(x), _ptr(residual), _ptr(weight), _ptr(out), _i(x.numel() // x.shape[-1]),
                     _i(x.shape[-1]), ctypes.c_float(eps), ctypes.c_int(code))
    return out


def rms_norm(x, weight, eps):
    out = _norm(x, None, weight, eps)
    return reference.rms_norm(x, weight, eps) if out is None else out


def fused_add_rms_norm(x, residual, weight, eps):
    """Like the reference, but the sum is written into `residual` in place."""
    out = _norm(x, residual, weight, eps)
    return reference.fused_add_rms_norm(x, residual, weight, eps) if out is None else (out, residual)


def silu_and_mul(x):
    lib, code = library(), _dtype(x)
    inter = x.shape[-1] // 2
    if lib is None or code is None or not x.is_contiguous() or inter > _MAX_INTER:
        return reference.silu_and_mul(x)
    out = torch.empty(*x.shape[:-1], inter, dtype=x.dtype)
    lib.silu_and_mul(_ptr(x), _ptr(out), _i(x.numel() // x.shape[-1]), _i(inter), ctypes.c_int(code))
    return out


def _rotary_ok(x, positions, cos_sin_cache) -> bool:
    return (_rows_ok(x) and x.shape[-1] <= _MAX_HEAD_DIM
            and positions.dtype == torch.int64 and positions.is_contiguous()
            and cos_sin_cache.dtype == torch.float32 and cos_sin_cache.is_contiguous())


def rotary_embedding(positions, q, k, cos_sin_cache):
    lib, code = library(), _dtype(q, k)
    if lib is None or code is None or not (_rotary_ok(q, positions, cos_sin_cache) and _rotary_ok(k, positions, cos_sin_cache)):
        return reference.rotary_embedding(positions, q, k, cos_sin_cache)
    tokens, head_dim = q.shape[0], q.shape[-1]
    adjacent = (q.stride(0) == k.stride(0)
                and k.data_ptr() == q.data_ptr() + q.shape[1] * head_dim * q.element_size())
    parts = [(q, q.shape[1] + k.shape[1])] if adjacent else [(q, q.shape[1]), (k, k.shape[1])]
    for x, heads in parts:   # q|k adjacent in the qkv output: one call for both
        lib.rotary_inplace(_ptr(x), _i(x.stride(0)), _i(tokens), _i(heads), _i(head_dim),
                           _ptr(positions), _ptr(cos_sin_cache), ctypes.c_int(code))
    return q, k
