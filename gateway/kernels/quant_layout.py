"""The packed-weight layout the quantized kernels read (quant.py's PackedWeight.data), and the
conversions into it: ggml's GGUF blocks (q8_0, q4_0, q4_1, q4_k, q6_k) parsed with numpy, and
the per-row form (unsigned codes, scale and min per block) that slicing and merging go through.

Every type is one of two kinds, so two kernels cover them all (w = the logical weight):
  * 8-bit codes ("w8": q8_0, q6_k, int8): u8 code u, w = d * (u - offset), offset 128 (q8_0,
    int8: the signed value + 128) or 32 (q6_k). Blocks of 32 (q6_k: 16) along K, d per block.
  * 4-bit codes ("w4": q4_0, q4_1, q4_k, int4): w = d * u + m per block of 32; q4_0 has
    m = -8 d (exact in f16), q4_k's d = d*sc and m = -dmin*m of each sub-block.
Scales and mins are float16 (exact for q8_0/q4_0/q4_1; q4_k / q6_k round d*sc to f16, a relative
2^-12 of the scale). Rows are tiled 16 at a time, so a kernel's 16 vector lanes are 16 output
rows and no horizontal sums are needed:
  q  w8: uint8 [N16/16, K'/4, 16, 4]  (lane = row, 4 consecutive k per lane: one vpdpbusd step)
     w4: uint8 [N16/16, K'/8, 16, 4]  byte i of a lane: low nibble k=8g+i, high nibble k=8g+4+i
  d, m: float16 [N16/16, K'/B, 16]  (w8 has no m)
N16 = N rounded up to 16 (pad rows are zero), K' = K rounded up to the block (pad columns zero)."""

from __future__ import annotations

import numpy as np
import torch

TILE = 16
W8_OFFSET = {"q8_0": 128, "int8": 128, "q6_k": 32}
BLOCK = {"q8_0": 32, "int8": 32, "q6_k": 16, "q4_0": 32, "q4_1": 32, "q4_k": 32, "int4": 32}
GGUF_BLOCK_BYTES = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q4_k": (256, 144), "q6_k": (256, 210)}


def kind(qtype: str) -> str:
    return "w8" if qtype in W8_OFFSET else "w4"


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's 32-value nibble run: bytes j hold values j (low) and j + 16 (high)."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml get_scale_min_k4: the 8 six-bit scales and mins packed in 12 bytes."""
    s = s.astype(np.uint8)
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def parse_gguf(qtype: str, raw: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """ggml blocks → (codes uint8 [N, K], d float32 [N, K/B], m float32 [N, K/B] or None)."""
    n, k = shape
    per, nbytes = GGUF_BLOCK_BYTES[qtype]
    if k % per:
        raise ValueError(f"{qtype}: in_features {k} is not a multiple of its block ({per})")
    b = np.ascontiguousarray(raw).view(np.uint8).reshape(n, k // per, nbytes)
    if qtype == "q8_0":
        return (b[..., 2:] ^ 0x80).reshape(n, k), _f16(b[..., 0:2]), None
    if qtype in ("q4_0", "q4_1"):
        d = _f16(b[..., 0:2])
        m = -8 * d if qtype == "q4_0" else _f16(b[..., 2:4])
        return _nibbles(b[..., 2 if qtype == "q4_0" else 4:]).reshape(n, k), d, m
    if qtype == "q4_k":
        d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]
        sc, mn = _k4_scales(b[..., 4:16])
        qs = b[..., 16:].reshape(n, k // 256, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
        return (qs & 15).reshape(n, k), (d * sc).reshape(n, -1), (-dmin * mn).reshape(n, -1)
    if qtype == "q6_k":
        ql = b[..., :128].reshape(n, -1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
        qh = b[..., 128:192].reshape(n, -1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
        codes = (ql & 15).reshape(n, -1, 2, 4, 32) | ((qh & 3) << 4).reshape(n, -1, 2, 4, 32)
        sc = b[..., 192:208].view(np.int8).astype(np.float32)
        return codes.reshape(n, k), (_f16(b[..., 208:210])[..., None] * sc).reshape(n, -1), None
    raise ValueError(f"unsupported GGUF type {qtype!r}")


def tile(qtype: str, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per-row (codes uint8 [N, K'], d/m [N, K'/B], any float) → the kernels' tiled layout."""
    n, k = codes.shape
    pad = (-n) % TILE
    codes = torch.nn.functional.pad(codes, (0, 0, 0, pad))
    tiles = (n + pad) // TILE
    if kind(qtype) == "w8":
        q = codes.view(tiles, TILE, k // 4, 4).permute(0, 2, 1, 3)
    else:
        c = codes.view(tiles, TILE, k // 8, 2, 4)
        q = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).permute(0, 2, 1, 3)
    out = {"q": q.contiguous()}
    for name, t in (("d", d), ("m", m)):
        if t is not None:
            t = torch.nn.functional.pad(t.to(torch.float16), (0, 0, 0, pad))
            out[name] = t.view(tiles, TILE, -1).transpose(1, 2).contiguous()
    return out


def untile(qtype: str, data: dict[str, torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The inverse of tile, rows [0, n): (codes uint8 [n, K'], d float16 [n, K'/B], m or None)."""
    q = data["q"].permute(0, 2, 1, 3)                    # [tiles, 16, K'/4 or K'/8, 4]
    if kind(qtype) == "w4":
        q = torch.stack([q & 15, q >> 4], dim=3)          # [tiles, 16, K'/8, 2, 4]
    codes = q.reshape(q.shape[0] * TILE, -1)[:n]
    rows = [data[name].transpose(1, 2).reshape(-1, data[name].shape[1])[:n] if name in data else None
            for name in ("d", "m")]
    return codes, rows[0], rows[1]


def rows_of(qtype: str, data: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Dequantized rows `ids` (float32 [T, K']), read straight from the tiles."""
    t, lane = ids // TILE, ids % TILE
    q = data["q"][t, :, lane]                             # [T, K'/4 or K'/8, 4]
    if kind(qtype) == "w4":
        q = torch.stack([q & 15, q >> 4], dim=2)          # [T, K'/8, 2, 4]
    codes = q.reshape(ids.shape[0], data["q"].shape[1] * (8 if kind(qtype) == "w4" else 4)).float()
    block = BLOCK[qtype]
    d = data["d"][t, :, lane].float().repeat_interleave(block, dim=1)
    if kind(qtype) == "w8":
        return (codes - W8_OFFSET[qtype]) * d
    return codes * d + data["m"][t, :, lane].float().repeat_interleave(block, dim=1)
