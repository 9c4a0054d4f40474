"""Float64 numpy references for the sparse-attention tests: the layer's math redone densely."""

import numpy as np


def expand_block_mask(block_mask: np.ndarray, block_q: int, block_kv: int) -> np.ndarray:
    """`[..., q_blocks, kv_blocks]` -> `[..., q_len, kv_len]`."""
    return np.repeat(np.repeat(block_mask, block_q, -2), block_kv, -1)


def masked_attention(q, k, v, mask, scale, bias=None):
    """Dense softmax attention in float64 with an element mask; empty rows give zeros.

    q [b, t, h, d]; k, v [b, t, kvh, d]; mask bool broadcastable to [b, h, t, t];
    bias [b, t, kvh] added to the logits of each key.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    heads, kv_heads = q.shape[2], k.shape[2]
    k = np.repeat(k, heads // kv_heads, axis=2)
    v = np.repeat(v, heads // kv_heads, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if bias is not None:
        bias = np.repeat(np.asarray(bias, np.float64), heads // kv_heads, axis=2)
        logits = logits + bias.transpose(0, 2, 1)[:, :, None, :]
    mask = np.broadcast_to(mask, logits.shape)
    logits = np.where(mask, logits, -np.inf)
    row_max = np.max(logits, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.where(mask, np.exp(logits - row_max), 0.0)
    total = weights.sum(-1, keepdims=True)
    probs = weights / np.where(total == 0, 1.0, total)
    return np.einsum("bhqk,bkhd->bqhd", probs, v)


def rotary(x, base):
    """Rotary positions on x [b, t, h, d] in float64, halves rotated as in
    moejax.attention."""
    t, d = x.shape[1], x.shape[-1]
    inv_freq = base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    angles = np.arange(t, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def causal_conv(k, taps):
    """out[t] = sum_s taps[s] * k[t - s], k [b, t, h, d], taps [width, h, d], float64."""
    out = np.zeros_like(k)
    for s in range(taps.shape[0]):
        out[:, s:] += k[:, : k.shape[1] - s] * taps[s]
    return out
