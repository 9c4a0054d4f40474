"""Dense masked attention that materialises [q_len, kv_len]: the ground truth for the tests.

It builds the element-level mask the block-sparse kernels must reproduce (`dense_mask`) and
runs a plain softmax over it, in whatever dtype it is given (the tests give float64). Quadratic
in length on purpose: it is simple enough to trust, and never used outside tests and benchmarks.
"""

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def dense_mask(
    block_mask: ArrayLike,
    q_len: int,
    kv_len: int,
    *,
    block_q: int,
    block_kv: int,
    element_mask: ArrayLike | None = None,
    causal: bool = False,
    window: int | None = None,
    q_segment_ids: ArrayLike | None = None,
    kv_segment_ids: ArrayLike | None = None,
) -> jax.Array:
    """Which (query, key) pairs attend: every mask of `block_sparse_attention` combined.

    Positions are aligned at the end: query i sits at position i + kv_len - q_len, so a query
    block appended after a cache sees the whole cache under `causal`.

    Args:
      block_mask: bool [batch or 1, heads or 1, q_len // block_q, kv_len // block_kv].
      element_mask: optional bool [batch or 1, heads or 1, q_len, kv_len].
      window: kv position j is visible from query position p when p - window < j <= p.
      q_segment_ids, kv_segment_ids: optional int [batch, q_len], [batch, kv_len].

    Returns:
      bool [batch or 1, heads or 1, q_len, kv_len].
    """
    block_mask = jnp.asarray(block_mask, bool)
    mask = jnp.repeat(jnp.repeat(block_mask, block_q, axis=2), block_kv, axis=3)
    if element_mask is not None:
        mask = mask & jnp.asarray(element_mask, bool)
    q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)  # [q_len, 1]
    kv_pos = jnp.arange(kv_len)[None, :]  # [1, kv_len]
    if causal:
        mask = mask & (q_pos >= kv_pos)
    if window is not None:
        mask = mask & (q_pos >= kv_pos) & (kv_pos > q_pos - window)
    if q_segment_ids is not None:
        q_seg = jnp.asarray(q_segment_ids)[:, None, :, None]  # [batch, 1, q_len, 1]
        kv_seg = jnp.asarray(kv_segment_ids)[:, None, None, :]  # [batch, 1, 1, kv_len]
        mask = mask & (q_seg == kv_seg)
    return mask


def block_sparse_attention_reference(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    block_mask: ArrayLike,
    *,
    block_q: int,
    block_kv: int,
    element_mask: ArrayLike | None = None,
    causal: bool = False,
    window: int | None = None,
    q_segment_ids: ArrayLike | None = None,
    kv_segment_ids: ArrayLike | None = None,
    scale: float | None = None,
    logit_soft_cap: float | None = None,
) -> jax.Array:
    """Softmax attention under `dense_mask`, computed densely in the dtype of `q`.

    Args:
      q: [batch, q_len, heads, head_dim].
      k, v: [batch, kv_len, kv_heads, head_dim]; heads is a multiple of kv_heads and query
        head h reads kv head h // (heads // kv_heads).
      the rest: as `dense_mask` and `block_sparse_attention`.

    Returns:
      [batch, q_len, heads, head_dim]; query rows with no visible key are zeros.
    """
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    q_len, heads, head_dim = q.shape[1], q.shape[2], q.shape[3]
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    k = jnp.repeat(k, group, axis=2)  # [batch, kv_len, heads, head_dim]
    v = jnp.repeat(v, group, axis=2)
    scale = head_dim**-0.5 if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale  # [batch, heads, q_len, kv_len]
    if logit_soft_cap is not None:
        logits = logit_soft_cap * jnp.tanh(logits / logit_soft_cap)
    mask = dense_mask(
        block_mask,
        q_len,
        kv_len,
        block_q=block_q,
        block_kv=block_kv,
        element_mask=element_mask,
        causal=causal,
        window=window,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
    )
    logits = jnp.where(mask, logits, -jnp.inf)
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    # exp(-inf) is 0 with a 0 gradient, so fully masked rows give 0 / 1 and no NaN anywhere.
    weights = jnp.exp(logits - row_max)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(total == 0, 1.0, total)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).astype(q.dtype)
