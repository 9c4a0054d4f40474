"""Per-block arithmetic shared by the TPU and GPU kernels: logits, masks, softmax updates.

Every function takes and returns values already loaded from refs, [block_q, block_kv] tiles, so
each kernel file only decides what to load and where (the grid, the block specs, the loops).
Masked logits are -inf; the "safe" maximum below replaces an all -inf row's maximum by 0 so
that exp(-inf - 0) = 0 and fully masked rows never produce inf - inf = NaN.
"""

import jax
import jax.numpy as jnp

from kernels_pallas.block_sparse_attention.spec import AttentionSpec


def logits(q: jax.Array, k: jax.Array, spec: AttentionSpec) -> jax.Array:
    """q: [bq, d], k: [bk, d] -> float32 [bq, bk], scaled and soft-capped."""
    s = jax.lax.dot_general(
        q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )  # [bq, bk]
    s = s * spec.scale
    if spec.logit_soft_cap is not None:
        s = spec.logit_soft_cap * jnp.tanh(s / spec.logit_soft_cap)
    return s


def soft_cap_grad(s: jax.Array, spec: AttentionSpec) -> jax.Array | float:
    """d(capped logit) / d(uncapped logit) from the capped logit s: 1 - tanh^2."""
    if spec.logit_soft_cap is None:
        return 1.0
    t = s / spec.logit_soft_cap
    return 1.0 - t * t


def visible(
    spec: AttentionSpec,
    q_block: jax.Array,
    kv_block: jax.Array,
    *,
    q_segment: jax.Array | None = None,
    kv_segment: jax.Array | None = None,
    element: jax.Array | None = None,
) -> jax.Array | None:
    """bool [bq, bk]: which elements of the (q_block, kv_block) tile attend; None = all.

    q_segment: int [bq, 1]; kv_segment: int [1, bk]; element: int8 [bq, bk] (nonzero = keep).
    """
    shape = (spec.block_q, spec.block_kv)
    mask = None

    def both(a: jax.Array | None, b: jax.Array) -> jax.Array:
        return b if a is None else a & b

    if spec.causal or spec.window is not None:
        # 2-D iotas: TPU vector units have no 1-D layout.
        q_pos = (
            q_block * spec.block_q + spec.q_offset + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
        )
        kv_pos = kv_block * spec.block_kv + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
        mask = both(mask, q_pos >= kv_pos)
        if spec.window is not None:
            mask = both(mask, kv_pos > q_pos - spec.window)
    if q_segment is not None:
        mask = both(mask, q_segment == kv_segment)
    if element is not None:
        mask = both(mask, element != 0)
    return mask


def masked(s: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Logits with invisible elements at -inf."""
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def tile_logits(
    q: jax.Array, k: jax.Array, spec: AttentionSpec, q_block, kv_block, masks: dict
) -> jax.Array:
    """Masked logits [bq, bk] of the (q_block, kv_block) tile; `masks` holds the loaded tiles
    `visible` takes (q_segment, kv_segment, element), any of them absent."""
    return masked(logits(q, k, spec), visible(spec, q_block, kv_block, **masks))


def safe_max(m: jax.Array) -> jax.Array:
    """A row maximum with -inf (nothing visible yet) replaced by 0."""
    return jnp.where(m == -jnp.inf, 0.0, m)


def online_update(
    s: jax.Array,
    v: jax.Array,
    m_prev: jax.Array,
    l_prev: jax.Array,
    acc_prev: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One flash-attention step: fold the tile's logits s [bq, bk] and values v [bk, d] into the
    running maximum m [bq, 1], normaliser l [bq, 1] and unnormalised output acc [bq, d]."""
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    m_safe = safe_max(m_new)
    alpha = jnp.exp(m_prev - m_safe)  # 0 when m_prev is -inf
    p = jnp.exp(s - m_safe)  # [bq, bk]; 0 where masked
    l_new = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
    pv = jax.lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )  # [bq, d]
    return m_new, l_new, alpha * acc_prev + pv


def finalize(m: jax.Array, total: jax.Array, acc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Output acc / total (0 for empty rows) and the logsumexp (0 for empty rows: their logits
    are all -inf, so exp(s - lse) stays 0 in the backward pass whatever lse is)."""
    empty = total == 0.0
    total = jnp.where(empty, 1.0, total)
    out = acc / total
    lse = jnp.where(empty, 0.0, safe_max(m) + jnp.log(total))
    return out, lse


def probs_and_dlogits(
    s: jax.Array,
    lse: jax.Array,
    do: jax.Array,
    v: jax.Array,
    delta: jax.Array,
    spec: AttentionSpec,
) -> tuple[jax.Array, jax.Array]:
    """Backward of one tile: probabilities p [bq, bk] and d(uncapped, unscaled logits).

    s: masked capped logits [bq, bk]; lse, delta: [bq, 1]; do: [bq, d]; v: [bk, d].
    The returned ds still needs the factor `spec.scale` (applied once to the sums).
    """
    p = jnp.exp(s - lse)  # 0 where masked
    dp = jax.lax.dot_general(
        do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )  # [bq, bk]
    ds = p * (dp - delta)
    # Masked elements have s = -inf; keep the soft-cap factor finite there (p is 0 anyway).
    ds = ds * soft_cap_grad(jnp.where(s == -jnp.inf, 0.0, s), spec)
    return p, ds


def tile_backward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    do: jax.Array,
    lse: jax.Array,
    delta: jax.Array,
    spec: AttentionSpec,
    q_block,
    kv_block,
    masks: dict,
) -> tuple[jax.Array, jax.Array]:
    """p and ds [bq, bk] of one visited tile: `probs_and_dlogits` of its `tile_logits`."""
    s = tile_logits(q, k, spec, q_block, kv_block, masks)
    return probs_and_dlogits(s, lse, do, v, delta, spec)


def matmul(a: jax.Array, b: jax.Array, *, transpose_a: bool = False) -> jax.Array:
    """a @ b (or a.T @ b) in float32 accumulation."""
    contract = (0,) if transpose_a else (1,)
    return jax.lax.dot_general(
        a, b, ((contract, (0,)), ((), ())), preferred_element_type=jnp.float32
    )
