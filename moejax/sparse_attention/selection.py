"""Content-routed block selection shared by MoBA, bi-level routing, the Routing Transformer and
dynamic-mask attention: pool tokens into blocks, score kv blocks per query block, keep the
top-k causal ones plus a local band, and return the block mask with the chosen indices.

All functions are pure jnp and jit-safe: shapes depend only on static block sizes and `top_k`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_NEG = -1e30  # below any real score; finite so top_k ordering stays well defined


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockSelection:
    """The outcome of routing.

    `block_mask [batch, heads or 1, q_blocks, kv_blocks]` bool (True = visit);
    `selected [batch, heads or 1, q_blocks, top_k]` int32 routed kv-block indices, -1 where a
    query block had fewer than `top_k` eligible blocks (diagnostics for routing recall).
    """

    block_mask: jax.Array
    selected: jax.Array


def pool_blocks(x: jax.Array, block: int) -> jax.Array:
    """Mean over each block of `block` tokens: `x [batch, length, heads, d]` ->
    `[batch, length // block, heads, d]` in float32."""
    batch, length, heads, dim = x.shape
    return x.astype(jnp.float32).reshape(batch, length // block, block, heads, dim).mean(axis=2)


def expand_kv_heads(x: jax.Array, heads: int) -> jax.Array:
    """Repeats kv heads for grouped-query attention: `[..., kv_heads, d]` -> `[..., heads, d]`;
    query head h reads kv head `h // (heads // kv_heads)`."""
    return jnp.repeat(x, heads // x.shape[-2], axis=-2)


def own_kv_block(q_blocks: int, block_q: int, block_kv: int) -> jax.Array:
    """`[q_blocks]` int32: the kv block holding the first token of each query block."""
    return (jnp.arange(q_blocks) * block_q) // block_kv


def past_blocks(q_blocks: int, kv_blocks: int, block_q: int, block_kv: int) -> jax.Array:
    """`[q_blocks, kv_blocks]` bool: kv blocks that end before their query block's own kv
    block starts (routing candidates; the own block is always attended, causally)."""
    own = own_kv_block(q_blocks, block_q, block_kv)
    return jnp.arange(kv_blocks)[None, :] < own[:, None]


def local_band(
    q_blocks: int, kv_blocks: int, block_q: int, block_kv: int, num_local: int
) -> jax.Array:
    """`[q_blocks, kv_blocks]` bool: the own kv block and the `num_local - 1` kv blocks before it
    (a block-granular sliding window of `num_local * block_kv` tokens at most)."""
    own = own_kv_block(q_blocks, block_q, block_kv)[:, None]
    kv = jnp.arange(kv_blocks)[None, :]
    return (kv <= own) & (kv > own - num_local)


def select_top_k(
    scores: jax.Array, eligible: jax.Array, top_k: int, always: jax.Array
) -> BlockSelection:
    """Keeps, per query block, the `top_k` highest-scoring eligible kv blocks, plus `always`.

    Args:
      scores: [batch, heads, q_blocks, kv_blocks] float (heads may be 1: shared routing).
      eligible: bool, broadcastable to `scores`: blocks routing may pick.
      top_k: static; clamped to `kv_blocks`. Ineligible picks are dropped (selected = -1).
      always: bool, broadcastable to `scores`: blocks visited regardless (own block, local band).

    Returns:
      A `BlockSelection`; the mask's heads axis is that of `scores`.
    """
    kv_blocks = scores.shape[-1]
    top_k = min(top_k, kv_blocks)
    eligible = jnp.broadcast_to(eligible, scores.shape)
    masked = jnp.where(eligible, scores.astype(jnp.float32), _NEG)
    _, index = jax.lax.top_k(masked, top_k)  # [batch, heads, q_blocks, top_k]
    picked_ok = jnp.take_along_axis(eligible, index, axis=-1)
    chosen = jnp.any(
        (index[..., None] == jnp.arange(kv_blocks)) & picked_ok[..., None], axis=-2
    )  # [batch, heads, q_blocks, kv_blocks]
    block_mask = chosen | jnp.broadcast_to(always, scores.shape)
    selected = jnp.where(picked_ok, index, -1).astype(jnp.int32)
    return BlockSelection(block_mask, selected)


def causal_density(block_mask: jax.Array, block_q: int, block_kv: int) -> jax.Array:
    """Share of causal `(q_block, kv_block)` pairs visited, averaged over batch and heads.

    `block_mask [batch or 1, heads or 1, q_blocks, kv_blocks]` -> float32 scalar.
    """
    q_blocks, kv_blocks = block_mask.shape[-2:]
    q_end = (jnp.arange(q_blocks) + 1) * block_q - 1
    causal = jnp.arange(kv_blocks)[None, :] * block_kv <= q_end[:, None]
    visited = jnp.sum(block_mask & causal, axis=(-2, -1)).astype(jnp.float32)
    return jnp.mean(visited) / jnp.sum(causal).astype(jnp.float32)
