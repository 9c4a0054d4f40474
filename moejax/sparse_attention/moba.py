"""Mixture of block attention (MoBA) with the fixes of FlashMoBA: small blocks and a short
causal convolution on keys.

MoBA: Mixture of Block Attention for Long-Context LLMs (Lu et al., 2025);
Optimizing Mixture of Block Attention (Xiao et al., 2025).

Keys are cut into blocks of `block_kv` tokens; each query block scores every earlier kv block by
the dot product of its mean query with the block's mean key, keeps the `top_k` best and always
its own block (attended with element causality). MoBA routes each query token; the block kernel
shares one visit list per query block, so routing here is per query block of `block_q` tokens:
`block_q = 1` is per-token MoBA, larger query blocks trade routing precision for speed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax.errors import require_config
from moejax.sparse_attention._plans import clamp_top_k, require_at_least, routed_plan
from moejax.sparse_attention.base import AttentionKindSpec, AttentionPlan, KindOptions, register
from moejax.sparse_attention.selection import (
    BlockSelection,
    expand_kv_heads,
    own_kv_block,
    past_blocks,
    pool_blocks,
    select_top_k,
)


def causal_key_conv(k: jax.Array, weights: jax.Array) -> jax.Array:
    """Depthwise causal convolution along the sequence: `out[t] = sum_s weights[s] * k[t - s]`.

    Args:
      k: [batch, length, kv_heads, head_dim].
      weights: [width, kv_heads, head_dim]; tap 0 is the current token, tap s the token s back.

    Returns:
      [batch, length, kv_heads, head_dim] in k's dtype. With `weights[0] = 1` and the other
      taps 0 it is the identity, which is how the layer initialises it.
    """
    width = weights.shape[0]
    padded = jnp.pad(k, ((0, 0), (width - 1, 0), (0, 0), (0, 0)))
    length = k.shape[1]
    out = jnp.zeros(k.shape, jnp.promote_types(k.dtype, jnp.float32))
    for s in range(width):
        shifted = padded[:, width - 1 - s : width - 1 - s + length]  # k[t - s], zeros before 0
        out = out + shifted * weights[s].astype(out.dtype)
    return out.astype(k.dtype)


def moba_select(
    q: jax.Array, k: jax.Array, *, block_q: int, block_kv: int, top_k: int
) -> BlockSelection:
    """MoBA routing: per query block, the `top_k` past kv blocks with the highest
    `mean(q_block) . mean(k_block)`, plus the query block's own kv block.

    Args:
      q: [batch, length, heads, head_dim] (the routing view of the queries).
      k: [batch, length, kv_heads, head_dim]; `heads % kv_heads == 0`.
      block_q: query block; must divide `block_kv` so a query block has one own kv block.
      block_kv: kv block.
      top_k: routed blocks per query block (clamped to the number of kv blocks).

    Returns:
      A `BlockSelection` with per-head masks `[batch, heads, q_blocks, kv_blocks]`.
    """
    if block_kv % block_q:
        raise ValueError(f"block_q={block_q} must divide block_kv={block_kv}")
    heads = q.shape[2]
    q_pool = pool_blocks(q, block_q)  # [b, q_blocks, heads, d]
    k_pool = expand_kv_heads(pool_blocks(k, block_kv), heads)  # [b, kv_blocks, heads, d]
    scores = jnp.einsum("bihd,bjhd->bhij", q_pool, k_pool)  # [b, heads, q_blocks, kv_blocks]
    q_blocks, kv_blocks = scores.shape[-2:]
    eligible = past_blocks(q_blocks, kv_blocks, block_q, block_kv)
    own = own_kv_block(q_blocks, block_q, block_kv)[:, None] == jnp.arange(kv_blocks)[None, :]
    return select_top_k(scores, eligible, top_k, own)


@dataclasses.dataclass(frozen=True)
class MobaOptions(KindOptions):
    """top_k: routed blocks per query block besides its own (clamped to the blocks before it,
    so a large top_k is dense). query_block_size: query tokens sharing one routing decision, a
    divisor of `attention.block_size`; None means the block size, 1 per-token routing as in the
    MoBA paper."""

    top_k: int = 3
    query_block_size: int | None = None

    def __post_init__(self) -> None:
        require_at_least(self, ("top_k",), 1)
        qb = self.query_block_size
        require_config(
            qb is None or qb >= 1, "attention.options.query_block_size", qb, "None or >= 1"
        )

    def check(self, block_size: int) -> None:
        qb = self.query_block_size
        require_config(
            qb is None or block_size % qb == 0,
            "attention.options.query_block_size",
            qb,
            f"None or a divisor of attention.block_size={block_size}",
        )

    @property
    def query_block(self) -> int | None:
        return self.query_block_size


def moba_plan(
    *, length: int, block_size: int, options: MobaOptions, queries: jax.Array, keys: jax.Array
) -> AttentionPlan:
    """`moba_select` per query block of `query_block_size` (default `block_size`) tokens."""
    top_k = clamp_top_k(options.top_k, length, block_size)
    block_q = options.query_block_size or block_size
    selection = moba_select(queries, keys, block_q=block_q, block_kv=block_size, top_k=top_k)
    return routed_plan(selection, block_q, block_size, top_k + 1)


MOBA = register(
    AttentionKindSpec("moba", moba_plan, needs=("queries", "keys"), options=MobaOptions)
)
