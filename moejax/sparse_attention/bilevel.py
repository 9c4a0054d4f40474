"""Bi-level routing attention, causal version for a decoder.

BiFormer: Vision Transformer with Bi-Level Routing Attention (Zhu et al., 2023).

Coarse level: the sequence is cut into regions of `block` tokens; region-to-region affinity is
the product of mean-pooled queries and keys over all heads together (one routing decision per
region, shared by every head, as in BiFormer). Each query region keeps its `top_k` most affine
earlier regions plus itself. Fine level: token attention over the union of the kept regions,
causal inside the own region.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

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


def bilevel_select(q: jax.Array, k: jax.Array, *, block: int, top_k: int) -> BlockSelection:
    """Region routing shared across heads.

    Args:
      q: [batch, length, heads, head_dim].
      k: [batch, length, kv_heads, head_dim].
      block: region size in tokens (query and kv regions alike).
      top_k: routed regions per query region (clamped to the number of regions).

    Returns:
      A `BlockSelection` with masks `[batch, 1, regions, regions]`.
    """
    heads = q.shape[2]
    q_pool = pool_blocks(q, block)  # [b, regions, heads, d]
    k_pool = expand_kv_heads(pool_blocks(k, block), heads)
    affinity = jnp.einsum("bihd,bjhd->bij", q_pool, k_pool)[:, None]  # [b, 1, regions, regions]
    regions = affinity.shape[-1]
    eligible = past_blocks(regions, regions, block, block)
    own = own_kv_block(regions, block, block)[:, None] == jnp.arange(regions)[None, :]
    return select_top_k(affinity, eligible, top_k, own)


@dataclasses.dataclass(frozen=True)
class BilevelOptions(KindOptions):
    """top_k: routed regions per query region besides its own (clamped to the regions before
    it); a region is one `attention.block_size` block."""

    top_k: int = 3

    def __post_init__(self) -> None:
        require_at_least(self, ("top_k",), 1)


def bilevel_plan(
    *, length: int, block_size: int, options: BilevelOptions, queries: jax.Array, keys: jax.Array
) -> AttentionPlan:
    """`bilevel_select` with regions of `block_size` tokens, one decision for all heads."""
    top_k = clamp_top_k(options.top_k, length, block_size)
    selection = bilevel_select(queries, keys, block=block_size, top_k=top_k)
    return routed_plan(selection, block_size, block_size, top_k + 1)


BILEVEL = register(
    AttentionKindSpec("bilevel", bilevel_plan, needs=("queries", "keys"), options=BilevelOptions)
)
