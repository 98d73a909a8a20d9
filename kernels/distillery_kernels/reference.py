"""NumPy references that define what each compiled operator computes (float32 throughout, as the kernels).

The INT32 accumulation must match exactly; the float results of the quantized linear without GELU also match
exactly (the same float32 operations in the same order); LayerNorm, attention and GELU sum or approximate in their
own order and match within a few float32 ulps (the tests' tolerances).
"""

from __future__ import annotations

import math

import numpy as np


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row u8 quantization with a zero point, as ONNX's DynamicQuantizeLinear does per tensor: the range holds
    0, scale = (max - min) / 255 (1 for an all-zero row), zp = rint(-min / scale), q = clip(rint(x / scale) + zp)."""
    x = np.asarray(x, np.float32)
    lo = np.minimum(x.min(axis=1), np.float32(0))
    hi = np.maximum(x.max(axis=1), np.float32(0))
    scale = ((hi - lo) / np.float32(255)).astype(np.float32)
    scale[scale == 0] = 1
    zp = np.clip(np.rint(-lo / scale), 0, 255).astype(np.int32)
    q = np.clip(np.rint(x / scale[:, None]).astype(np.int32) + zp[:, None], 0, 255).astype(np.uint8)
    return q, scale, zp


def gemm_s32(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """u8 [M, K] x s8 [K, N] -> exact int32 [M, N]."""
    return a.astype(np.int32) @ w.astype(np.int32)


def block_density(w: np.ndarray, block: tuple[int, int]) -> float:
    """The share of (block_k x block_n) blocks of w [K, N] that hold a non-zero weight (edge blocks partial), the
    blocks a block-sparse PackedWeights keeps: its matmul is gemm_s32 of the same w."""
    bk, bn = block
    k, n = w.shape
    padded = np.zeros((-(-k // bk) * bk, -(-n // bn) * bn), dtype=bool)
    padded[:k, :n] = w != 0
    blocks = padded.reshape(padded.shape[0] // bk, bk, padded.shape[1] // bn, bn).any(axis=(1, 3))
    return float(blocks.mean())


def gelu(y: np.ndarray) -> np.ndarray:
    """The exact (erf) GELU that BERT-family models use."""
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return (0.5 * y * (1.0 + erf(y.astype(np.float64) / math.sqrt(2.0)))).astype(np.float32)


def linear(x: np.ndarray, w: np.ndarray, scale: np.ndarray, bias: np.ndarray | None, gelu_: bool = False) -> np.ndarray:
    """quantize_rows(x) @ w (int8 [K, N], per-column `scale`), dequantized: (acc - zp colsum) (sa sw) + bias."""
    x = np.asarray(x, np.float32)
    flat = x.reshape(-1, x.shape[-1])
    q, sa, zp = quantize_rows(flat)
    acc = gemm_s32(q, w) - zp[:, None] * w.astype(np.int32).sum(axis=0)[None, :]
    y = acc.astype(np.float32) * (sa[:, None] * scale.astype(np.float32)[None, :])
    if bias is not None:
        y = y + bias.astype(np.float32)[None, :]
    else:
        y = y + np.float32(0)
    if gelu_:
        y = gelu(y)
    return y.reshape(*x.shape[:-1], w.shape[1])


def add_layernorm(x: np.ndarray, residual: np.ndarray | None, gamma: np.ndarray, beta: np.ndarray, eps: float):
    s = x if residual is None else x + residual
    mean = s.mean(axis=-1, keepdims=True, dtype=np.float64)
    var = ((s - mean) ** 2).mean(axis=-1, keepdims=True)
    return ((s - mean) / np.sqrt(var + eps) * gamma + beta).astype(np.float32)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, heads: int) -> np.ndarray:
    """softmax(q k^T / sqrt(d) over the keys whose mask is non-zero) v, per head; a row with no key gives 0."""
    b, s, width = q.shape
    d = width // heads

    def split(t):
        return t.astype(np.float64).reshape(b, s, heads, d).transpose(0, 2, 1, 3)

    scores = split(q) @ split(k).transpose(0, 1, 3, 2) / math.sqrt(d)
    keep = (mask != 0)[:, None, None, :]
    scores = np.where(keep, scores, -np.inf)
    top = scores.max(axis=-1, keepdims=True)
    e = np.where(keep, np.exp(scores - np.where(np.isfinite(top), top, 0)), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    p = np.divide(e, total, out=np.zeros_like(e), where=total > 0)
    return (p @ split(v)).transpose(0, 2, 1, 3).reshape(b, s, width).astype(np.float32)
