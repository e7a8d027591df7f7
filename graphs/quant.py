"""Blockwise weight-only quantization math (numpy only): quantize, pack and dequantize a MatMul weight W [K, N].

Blocks run along K (the reduction axis): each column n of W is cut into ceil(K / block) blocks of `block`
rows (the last one zero-padded), and each block gets one scale (and, asymmetric, one zero point).

    symmetric   m = the block's value of largest magnitude (sign kept); scale = m / -2^(bits-1);
                q = clip(round(w / scale) + 2^(bits-1), 0, 2^bits - 1); zero point = 2^(bits-1) implicitly
                (ONNX Runtime's MatMulNBits default: 8 for int4, 128 for int8). The extreme value maps to code 0
                exactly, which gives one more level than absmax / (2^(bits-1) - 1).
    asymmetric  lo = min(0, min w), hi = max(0, max w); scale = (hi - lo) / (2^bits - 1);
                zp = clip(round(-lo / scale), 0, 2^bits - 1); q = clip(round(w / scale) + zp, 0, 2^bits - 1)

    dequantize  w ~= (q - zp) * scale

Methods: "rtn" is round-to-nearest with the scales above. "search" (the error-minimizing scale search of
llama.cpp's make_qx_quants, without importance weights) tries SEARCH_STEPS clipping factors f in [1, 0.5] per
block (symmetric: extreme * f; asymmetric: [lo, hi] * f), rounds with each, refits the scale to the codes by
least squares (scale = sum(w * c) / sum(c * c) with c = code - zp), and keeps the candidate of smallest squared
error -- clipping a rare outlier buys finer steps for the rest of the block. Same formats, same kernels.

Float zero points (asymmetric, MatMulNBits only: its zero_points input may have the scales' type): the block's
grid is lo + scale * code with lo = the block minimum (0 need not be on the grid), and the search fits scale and
offset jointly by least squares for each candidate's codes. A block that already lies on a 2^bits-level grid
(a llama.cpp Q4_1 / Q4_K source, dequantized) is reproduced exactly.
ONNX Runtime 1.32 runs MatMulNBits with a float zero_points input on a slow path (B dequantized to float at every
call, ~20x an integer-zero-point MatMulNBits at decode); ``split_offsets`` rewrites the same grid as the integer
kernel plus an exact per-block offset term that the graph adds (graphs/passes/block_offsets.py).

Layouts produced:
    MatMulNBits (com.microsoft)   B uint8 [N, k_blocks, block * bits / 8], codes packed low-nibble-first along K;
                                  scales [N, k_blocks]; zero points uint8 [N, ceil(k_blocks * bits / 8)]
                                  (4-bit: two per byte, low nibble first; 8-bit: one per byte)
    DequantizeLinear (opset 21+)  blocked along axis 0: codes [K, N] (int4/int8 symmetric with zero point 0,
                                  uint4/uint8 asymmetric), scales and zero points [ceil(K / block), N]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)
METHODS = ("rtn", "search")
SEARCH_STEPS = 11


@dataclass(frozen=True)
class Blockwise:
    """Quantized W [K, N]: unsigned codes [N, k_blocks, block] (uint8, zero-padded past K), scales and zero
    points [N, k_blocks] (zero points are the codes' offset: 2^(bits-1) when symmetric)."""

    codes: np.ndarray
    scales: np.ndarray  # float32
    zero_points: np.ndarray  # uint8
    bits: int
    block: int
    k: int
    symmetric: bool


def quantize_blockwise(w: np.ndarray, bits: int, block: int, symmetric: bool,
                       positive_scales: bool = False, method: str = "rtn", float_zero_points: bool = False) -> Blockwise:
    """positive_scales (symmetric only): scale = absmax / (2^(bits-1) - 1) > 0 instead of the signed extreme / -2^(bits-1);
    TensorRT's DequantizeLinear import requires positive scales ("Scale coefficients must all be positive")."""
    if method not in METHODS:
        raise ValueError(f"quantization method must be one of {METHODS}, got {method!r}")
    if float_zero_points and symmetric:
        raise ValueError("float zero points are for asymmetric quantization")
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if block not in BLOCK_SIZES:
        raise ValueError(f"block size must be one of {BLOCK_SIZES}, got {block}")
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight [K, N], got shape {w.shape}")
    k, n = w.shape
    nb = -(-k // block)
    padded = np.zeros((nb * block, n), np.float32)
    padded[:k] = w
    x = padded.T.reshape(n, nb, block)  # [N, k_blocks, block]
    qmax = (1 << bits) - 1
    if float_zero_points:
        scales, zp, codes = _float_zero_points(x, bits, SEARCH_STEPS if method == "search" else 1)
        return Blockwise(codes, scales, zp, bits, block, k, symmetric)
    if method == "search":
        scales, zp, codes = _search(x, bits, symmetric, positive_scales)
        return Blockwise(codes, scales, zp, bits, block, k, symmetric)
    if symmetric:
        half = 1 << (bits - 1)
        idx = np.abs(x).argmax(axis=-1)[..., None]
        m = np.take_along_axis(x, idx, axis=-1)[..., 0]
        scales = np.abs(m) / float(half - 1) if positive_scales else m / -float(half)
        safe = np.where(scales == 0, 1.0, scales)
        zp = np.full((n, nb), half, np.uint8)
    else:
        lo, hi = np.minimum(x.min(axis=-1), 0.0), np.maximum(x.max(axis=-1), 0.0)
        scales = (hi - lo) / qmax
        safe = np.where(scales == 0, 1.0, scales)
        zp = np.clip(np.round(-lo / safe), 0, qmax).astype(np.uint8)
    codes = np.clip(np.round(x / safe[..., None]) + zp[..., None], 0, qmax).astype(np.uint8)
    return Blockwise(codes, scales.astype(np.float32), zp, bits, block, k, symmetric)


def _search(x: np.ndarray, bits: int, symmetric: bool, positive_scales: bool):
    """Per block, the clipping factor whose least-squares-refit scale gives the smallest squared error."""
    qmax, half = (1 << bits) - 1, 1 << (bits - 1)
    if symmetric:  # first-guess scale of clipping factor 1 (as rtn), and the fixed zero point
        if positive_scales:
            base = np.abs(x).max(axis=-1) / np.float32(half - 1)
        else:
            base = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)[..., 0] / np.float32(-half)
    else:
        lo, hi = np.minimum(x.min(axis=-1), 0.0), np.maximum(x.max(axis=-1), 0.0)
        base = (hi - lo) / np.float32(qmax)
    best_err = np.full(x.shape[:-1], np.inf, np.float32)
    best = (np.zeros(x.shape[:-1], np.float32), np.zeros(x.shape[:-1], np.float32), np.zeros(x.shape, np.float32))
    for f in np.linspace(1.0, 0.5, SEARCH_STEPS, dtype=np.float32):
        scales = base * f
        safe = np.where(scales == 0, np.float32(1.0), scales)
        zp = np.full(scales.shape, half, np.float32) if symmetric else np.clip(np.round(-lo * f / safe), 0, qmax)
        codes = np.clip(np.round(x / safe[..., None]) + zp[..., None], 0, qmax)
        c = codes - zp[..., None]
        num, den = np.einsum("nbk,nbk->nb", x, c), np.einsum("nbk,nbk->nb", c, c)
        refit = np.where(den > 0, num / np.where(den > 0, den, np.float32(1.0)), scales)
        if positive_scales:
            refit = np.where(refit > 0, refit, scales)
        err = np.square(x - c * refit[..., None]).sum(axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = (np.where(better, refit, best[0]), np.where(better, zp, best[1]),
                np.where(better[..., None], codes, best[2]))
    return best[0].astype(np.float32), best[1].astype(np.uint8), best[2].astype(np.uint8)


def _float_zero_points(x: np.ndarray, bits: int, steps: int):
    """Grid lo + scale * code; candidates shrink [min, max] about its middle, then (scale, lo) are refit by least
    squares for the candidate's codes. Returns scales, float zero points (= -lo / scale) and codes."""
    qmax = np.float32((1 << bits) - 1)
    lo0, hi0 = x.min(axis=-1), x.max(axis=-1)
    mid, half = (lo0 + hi0) / 2, (hi0 - lo0) / 2
    best_err = np.full(x.shape[:-1], np.inf, np.float32)
    best = (np.zeros_like(lo0), np.zeros_like(lo0), np.zeros(x.shape, np.float32))
    for f in np.linspace(1.0, 0.5, steps, dtype=np.float32):
        lo, scale = mid - half * f, 2 * half * f / qmax
        safe = np.where(scale == 0, np.float32(1.0), scale)
        codes = np.clip(np.round((x - lo[..., None]) / safe[..., None]), 0, qmax)
        if steps > 1:  # least squares x ~ scale * code + lo for these codes
            cm, xm = codes.mean(-1), x.mean(-1)
            var = np.square(codes - cm[..., None]).mean(-1)
            cov = ((codes - cm[..., None]) * (x - xm[..., None])).mean(-1)
            scale = np.where(var > 0, cov / np.where(var > 0, var, np.float32(1.0)), scale)
            lo = np.where(var > 0, xm - scale * cm, lo)
        err = np.square(x - (lo[..., None] + codes * scale[..., None])).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = (np.where(better, scale, best[0]), np.where(better, lo, best[1]), np.where(better[..., None], codes, best[2]))
    scale, lo, codes = best
    flat = scale == 0  # a block of one value lo: code 0, zero point -1, scale lo gives (0 + 1) * lo
    zp = np.where(flat, np.where(lo == 0, np.float32(0.0), np.float32(-1.0)), -lo / np.where(flat, 1, scale))
    scale = np.where(flat, np.where(lo == 0, np.float32(1.0), lo), scale)
    return scale.astype(np.float32), zp.astype(np.float32), codes.astype(np.uint8)


def dequantize(q: Blockwise) -> np.ndarray:
    """The reference formula: W[k, n] = (code - zp) * scale, back in [K, N] float32."""
    x = (q.codes.astype(np.float32) - q.zero_points[..., None].astype(np.float32)) * q.scales[..., None]
    n, nb, block = x.shape
    return x.reshape(n, nb * block).T[: q.k]


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes along the last axis: 8-bit as is, 4-bit two per byte, element 2i in the low nibble."""
    codes = np.asarray(codes, np.uint8)
    if bits == 8:
        return codes.copy()
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (codes[..., 0::2] & 0x0F) | ((codes[..., 1::2] & 0x0F) << 4)


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    packed = np.asarray(packed, np.uint8)
    if bits == 8:
        return packed[..., :count].copy()
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), np.uint8)
    out[..., 0::2], out[..., 1::2] = packed & 0x0F, packed >> 4
    return out[..., :count]


def matmul_nbits_tensors(q: Blockwise) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B uint8 [N, k_blocks, blob], scales float32 [N, k_blocks], packed zero points or None when symmetric)."""
    b = pack_codes(q.codes, q.bits)
    if q.zero_points.dtype == np.float32:  # float zero points: one per block, unpacked, the scales' type
        return b, q.scales, q.zero_points.copy()
    zp = None if q.symmetric else pack_codes(q.zero_points, q.bits)
    return b, q.scales, zp


def dequantize_matmul_nbits(b: np.ndarray, scales: np.ndarray, zp: np.ndarray | None, k: int, n: int,
                            bits: int, block: int) -> np.ndarray:
    """MatMulNBits' reference semantics on its own inputs (default zero point 2^(bits-1)) -> W [K, N]."""
    nb = -(-k // block)
    codes = unpack_codes(b.reshape(n, nb, -1), bits, block)
    z = (np.full((n, nb), 1 << (bits - 1), np.uint8) if zp is None
         else unpack_codes(zp.reshape(n, -1), bits, nb))
    return dequantize(Blockwise(codes, scales.reshape(n, nb).astype(np.float32), z, bits, block, k, zp is None))


def split_offsets(q: Blockwise) -> tuple[Blockwise, np.ndarray]:
    """A float-zero-point grid as an integer kernel plus one offset per block (exact algebra, any asymmetric grid):

        (code - zp) * scale  =  (code - h) * scale  +  (h - zp) * scale          h = 2^(bits-1), MatMulNBits' default

    so x @ W = x @ W_int + sum over blocks b of offset[b, n] * (sum of x over block b's K rows). Returns
    (W_int: the same codes and scales with the default zero point h -- the symmetric layout, no zero-point input,
    which ONNX Runtime runs on its packed integer kernels -- and offsets [k_blocks, N] float32)."""
    if q.zero_points.dtype != np.float32:
        raise ValueError("split_offsets takes a float-zero-point Blockwise (quantize_blockwise(float_zero_points=True))")
    h = np.float32(1 << (q.bits - 1))
    kernel = Blockwise(q.codes, q.scales, np.full(q.scales.shape, 1 << (q.bits - 1), np.uint8), q.bits, q.block, q.k,
                       True)
    return kernel, ((h - q.zero_points) * q.scales).T.astype(np.float32)


def block_indicator(k: int, block: int) -> np.ndarray:
    """S [K, k_blocks] float32 with S[i, b] = 1 when row i lies in block b: x @ S sums x over each block."""
    nb = -(-k // block)
    s = np.zeros((k, nb), np.float32)
    s[np.arange(k), np.arange(k) // block] = 1.0
    return s


def qdq_tensors(q: Blockwise) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(codes [K, N] int8 (symmetric, values in [-2^(bits-1), 2^(bits-1) - 1]) or uint8 (asymmetric),
    scales float32 [k_blocks, N], zero points uint8 [k_blocks, N] or None) for a blocked DequantizeLinear."""
    if q.zero_points.dtype == np.float32:
        raise ValueError("float zero points have no DequantizeLinear form (its zero point has the codes' type)")
    n, nb, block = q.codes.shape
    codes = q.codes.reshape(n, nb * block).T[: q.k]
    if q.symmetric:
        return (codes.astype(np.int16) - (1 << (q.bits - 1))).astype(np.int8), q.scales.T.copy(), None
    return codes.copy(), q.scales.T.copy(), q.zero_points.T.copy()
