"""ctypes binding of the quantized-weight C kernels (cpu/quant_gemv.c, quant_bf16.c, quant_f32.c,
quant_gemm.c, built into cpu_ops' library): `linear` returns None wherever they do not apply (no library, no AVX512-VNNI at run
time, a dtype other than fp32/bf16, a tensor not on the CPU), and the caller runs the reference."""

from __future__ import annotations

import ctypes
import weakref

import torch

from gateway.kernels import cpu_ops
from gateway.kernels import quant_layout as layout

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_fn = None            # {"vnni": quant_linear_vnni, "bf16": ..., "f32": ..., "gemm": quant_gemm_w8a8}, or False
_rows_fn = None       # the bound quant_rows
_vp, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


class _QWeight(ctypes.Structure):   # cpu/quant_gemv.c's struct qweight
    _fields_ = [("q", _vp), ("d", _vp), ("m", _vp), ("n", _i64), ("k", _i64), ("kp", _i64), ("block", _i64),
                ("offset", _i64), ("w4", _i64)]


# PackedWeight → its struct qweight, built at the first product: a decode step makes ~120 of
# these calls, so the per-call Python work is a lookup and six plain ints.
_described: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _bind():
    global _fn, _rows_fn
    lib = cpu_ops.library()
    fns = {name: getattr(lib, f"quant_linear_{name}", None) if lib is not None else None for name in ("vnni", "bf16", "f32")}
    fns["gemm"] = getattr(lib, "quant_gemm_w8a8", None) if lib is not None else None
    for f in fns.values():
        if f is not None:
            f.argtypes = [_vp, _i64, _int, _vp, _vp, _vp]
            f.restype = _int
    fn = fns if fns["vnni"] is not None else None
    rows = getattr(lib, "quant_rows", None) if lib is not None else None
    if rows is not None:
        rows.argtypes = [_vp, _vp, _vp, _i64, _i64, _i64, _i64, _int, _vp, _i64, _i64, _vp, _int]
        rows.restype = _int
    _fn, _rows_fn = fn or False, rows or False
    return _fn


def _describe(pw) -> tuple[_QWeight, int] | None:
    q, d, m = pw.data["q"], pw.data["d"], pw.data.get("m")
    if not all(t.is_cpu and t.is_contiguous() for t in pw.data.values()):
        return None
    desc = _QWeight(q.data_ptr(), d.data_ptr(), None if m is None else m.data_ptr(), pw.shape[0], pw.shape[1],
                    q.shape[1] * (8 if m is not None else 4), layout.BLOCK[pw.qtype], layout.W8_OFFSET.get(pw.qtype, 0),
                    int(m is not None))
    entry = _described[pw] = (desc, ctypes.addressof(desc))
    return entry


def linear(x: torch.Tensor, pw, bias: torch.Tensor | None, kernel: str = "vnni") -> torch.Tensor | None:
    """x [M, K] @ pw^T (+ bias) with a C kernel ("vnni": int8 activations, quant_gemv.c; "bf16":
    bf16 activations, 4-bit codes only, quant_bf16.c; "f32": fp32 activations and FMAs,
    quant_f32.c; "gemm": W8A8, activations int8 per token, weights int8 per output channel
    only, quant_gemm.c), or None where it does not apply."""
    fns = _fn if _fn is not None else _bind()
    code = _DTYPES.get(x.dtype)
    if not fns or code is None or not x.is_cpu:
        return None
    fn = fns[kernel]
    if fn is None:
        return None
    x = x.contiguous()
    if bias is not None and (bias.dtype != x.dtype or not bias.is_contiguous()):
        bias = bias.to(x.dtype).contiguous()
    entry = _described.get(pw) or _describe(pw)
    if entry is None:
        return None
    out = torch.empty(x.shape[0], pw.shape[0], dtype=x.dtype)
    if fn(x.data_ptr(), x.shape[0], code, entry[1], None if bias is None else bias.data_ptr(), out.data_ptr()) != 0:
        return None
    return out


def rows(ids: torch.Tensor, qtype: str, shape: tuple[int, int], data: dict[str, torch.Tensor],
         dtype: torch.dtype) -> torch.Tensor | None:
    """Dequantized rows `ids` of a packed table, or None (the caller's reference); IndexError
    for an id outside the table."""
    if _fn is None:
        _bind()
    code = _DTYPES.get(dtype)
    if not _rows_fn or code is None:
        return None
    ids = ids.to(torch.int64).contiguous()
    q, d, m = data["q"], data["d"], data.get("m")
    kp = q.shape[1] * (8 if m is not None else 4)
    out = torch.empty(ids.shape[0], shape[1], dtype=dtype)
    rc = _rows_fn(q.data_ptr(), d.data_ptr(), None if m is None else m.data_ptr(), kp, shape[1], layout.BLOCK[qtype],
                  layout.W8_OFFSET.get(qtype, 0), int(m is not None), ids.data_ptr(), ids.shape[0], shape[0],
                  out.data_ptr(), code)
    if rc == -2:
        raise IndexError(f"quant_embedding: ids outside [0, {shape[0]})")
    return out if rc == 0 else None
