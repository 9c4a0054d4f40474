"""Block-sparse attention as gathers and batched matmuls in plain XLA: linear in length.

Each query block gathers the k and v blocks its visit list names (`mask_info.visit_lists`,
padded to the static `max_kv_blocks`) and runs a masked softmax over just those, with logits in
at least float32. Nothing is scattered: every query block writes its own output rows, so the
cost is O(q_len * max_kv_blocks * block_kv) for compute and memory instead of O(q_len * kv_len).
`jax.grad` of this code is the backward pass; its residuals (gathered blocks and probabilities)
have the same linear size, and the gathers transpose into scatter-adds into k and v.

This is what "auto" runs on CPU, where Pallas kernels only exist in (slow) interpret mode.
"""

import jax
import jax.numpy as jnp

from kernels_pallas.block_sparse_attention.mask_info import VisitLists
from kernels_pallas.block_sparse_attention.spec import AttentionSpec


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    visits: VisitLists,
    element_mask: jax.Array | None,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    spec: AttentionSpec,
) -> jax.Array:
    """Gather-based block-sparse attention; arguments already checked by `ops`.

    Args:
      q: [batch, q_len, heads, head_dim].
      k, v: [batch, kv_len, kv_heads, head_dim].
      visits: lists of shape [batch or 1, heads or 1, q_blocks, max_kv_blocks].
      element_mask: bool [batch or 1, heads or 1, q_len, kv_len] or None.
      q_segment_ids, kv_segment_ids: int32 [batch, q_len], [batch, kv_len], or both None.
      spec: the static configuration.

    Returns:
      [batch, q_len, heads, head_dim] in the dtype of q.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    bq, bk = spec.block_q, spec.block_kv
    q_blocks, kv_blocks = q_len // bq, kv_len // bk
    width = visits.indices.shape[-1]
    compute_dtype = jnp.promote_types(q.dtype, jnp.float32)

    index = jnp.broadcast_to(visits.indices, (batch, heads, q_blocks, width))
    counts = jnp.broadcast_to(visits.counts, (batch, heads, q_blocks))
    b_ix = jnp.arange(batch)[:, None, None, None]
    kv_head = (jnp.arange(heads) // (heads // kv_heads))[None, :, None, None]

    def blocks(x: jax.Array) -> jax.Array:
        x = x.reshape(batch, kv_blocks, bk, kv_heads, head_dim)
        return x[b_ix, index, :, kv_head, :]  # [batch, heads, q_blocks, width, bk, head_dim]

    k_blocks, v_blocks = blocks(k), blocks(v)
    q_rows = q.reshape(batch, q_blocks, bq, heads, head_dim).transpose(0, 3, 1, 2, 4)
    logits = jnp.einsum(
        "bhiqd,bhimkd->bhiqmk", q_rows, k_blocks, preferred_element_type=compute_dtype
    )  # [batch, heads, q_blocks, bq, width, bk]
    logits = logits * spec.scale
    if spec.logit_soft_cap is not None:
        logits = spec.logit_soft_cap * jnp.tanh(logits / spec.logit_soft_cap)

    q_pos = (jnp.arange(q_len) + spec.kv_len - spec.q_len).reshape(q_blocks, bq)
    kv_pos = index[..., None] * bk + jnp.arange(bk)  # [batch, heads, q_blocks, width, bk]
    mask = jnp.arange(width)[:, None] < counts[..., None, None]  # padded slots are not real
    mask = mask[:, :, :, None]  # [batch, heads, q_blocks, 1, width, bk]
    q_pos6 = q_pos[None, None, :, :, None, None]
    kv_pos6 = kv_pos[:, :, :, None]
    if spec.causal or spec.window is not None:
        mask = mask & (q_pos6 >= kv_pos6)
    if spec.window is not None:
        mask = mask & (kv_pos6 > q_pos6 - spec.window)
    if q_segment_ids is not None:
        kv_seg = kv_segment_ids.reshape(batch, kv_blocks, bk)[b_ix, index]  # [b, h, i, w, bk]
        q_seg = q_segment_ids.reshape(batch, 1, q_blocks, bq)[..., None, None]
        mask = mask & (q_seg == kv_seg[:, :, :, None])
    if element_mask is not None:
        mb, mh = element_mask.shape[:2]
        em = element_mask.reshape(mb, mh, q_blocks, bq, kv_blocks, bk)
        eb = b_ix if mb > 1 else 0
        eh = jnp.arange(heads)[None, :, None, None] if mh > 1 else 0
        ei = jnp.arange(q_blocks)[None, None, :, None]
        em = em[eb, eh, ei, :, index, :]  # [batch, heads, q_blocks, width, bq, bk]
        mask = mask & jnp.swapaxes(em, 3, 4)

    shape = logits.shape
    flat = (batch, heads, q_blocks, bq, width * bk)
    logits = jnp.where(mask, logits, -jnp.inf).reshape(flat)
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    # Masked logits are -inf: exp gives 0 with a 0 gradient, so empty rows are 0, never NaN.
    weights = jnp.exp(logits - row_max)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = (weights / jnp.where(total == 0, 1.0, total)).reshape(shape)
    out = jnp.einsum(
        "bhiqmk,bhimkd->bhiqd",
        probs.astype(v.dtype),
        v_blocks,
        preferred_element_type=compute_dtype,
    )  # [batch, heads, q_blocks, bq, head_dim]
    out = out.transpose(0, 2, 3, 1, 4).reshape(batch, q_len, heads, head_dim)
    return out.astype(q.dtype)
