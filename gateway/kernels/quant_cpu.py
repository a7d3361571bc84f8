"""ctypes binding of the quantized-weight C kernels (cpu/quant_gemv.c, built into cpu_ops'
library): `linear` returns None wherever they do not apply (no library, no AVX512-VNNI at run
time, a dtype other than fp32/bf16, a tensor not on the CPU), and the caller runs the reference."""

from __future__ import annotations

import ctypes

import torch

from gateway.kernels import cpu_ops
from gateway.kernels import quant_layout as layout

_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_fn = None            # the bound quant_linear_vnni, or False when unavailable
_rows_fn = None       # the bound quant_rows
_vp, _i64, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _bind():
    global _fn
    lib = cpu_ops.library()
    fn = getattr(lib, "quant_linear_vnni", None) if lib is not None else None
    if fn is not None:
        fn.argtypes = [_vp, _i64, _i64, _int, _vp, _vp, _vp, _i64, _i64, _i64, _i64, _int, _vp, _vp]
        fn.restype = _int
    rows = getattr(lib, "quant_rows", None) if lib is not None else None
    if rows is not None:
        rows.argtypes = [_vp, _vp, _vp, _i64, _i64, _i64, _i64, _int, _vp, _i64, _i64, _vp, _int]
        rows.restype = _int
    global _rows_fn
    _fn, _rows_fn = fn or False, rows or False
    return _fn


def linear(x: torch.Tensor, qtype: str, shape: tuple[int, int], data: dict[str, torch.Tensor],
           bias: torch.Tensor | None) -> torch.Tensor | None:
    fn = _fn if _fn is not None else _bind()
    code = _DTYPES.get(x.dtype)
    if not fn or code is None or x.device.type != "cpu":
        return None
    x = x.contiguous()
    if bias is not None:
        bias = bias.to(x.dtype).contiguous()
    n, k = shape
    q, d, m = data["q"], data["d"], data.get("m")
    kp = q.shape[1] * (8 if m is not None else 4)
    out = torch.empty(x.shape[0], n, dtype=x.dtype)
    rc = fn(x.data_ptr(), x.shape[0], k, code, q.data_ptr(), d.data_ptr(), None if m is None else m.data_ptr(),
            n, kp, layout.BLOCK[qtype], layout.W8_OFFSET.get(qtype, 0), int(m is not None),
            None if bias is None else bias.data_ptr(), out.data_ptr())
    if rc != 0:
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
