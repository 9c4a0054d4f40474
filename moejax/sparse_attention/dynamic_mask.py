"""Trainable dynamic-mask sparse attention (DMA), at block granularity.

Trainable Dynamic Mask Sparse Attention (Shi et al., 2025).

DMA derives a content-aware mask from the values: a learned projection gives each key an
importance `z_j = a_h * softplus(v_j . delta_h)` per kv head. The importance is both a mask
(each query keeps the most important earlier keys plus a local window) and an additive bias on
the attention logits, through which `delta` and `a` get their gradient. Here the keeping is per
kv block (a block counts as important as its most important key) so the block kernel can skip
the rest; the bias stays per key.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax.sparse_attention._plans import clamp_top_k, num_local, require_at_least, routed_plan
from moejax.sparse_attention.base import (
    AttentionKindSpec,
    AttentionPlan,
    HeadShape,
    KindOptions,
    Params,
    register,
)
from moejax.sparse_attention.selection import (
    BlockSelection,
    expand_kv_heads,
    local_band,
    past_blocks,
    select_top_k,
)


def key_importance(v: jax.Array, delta: jax.Array, gain: jax.Array) -> jax.Array:
    """`z [batch, length, kv_heads]` float32 from `v [batch, length, kv_heads, head_dim]`,
    `delta [kv_heads, head_dim]`, `gain [kv_heads]`."""
    proj = jnp.einsum("blhd,hd->blh", v.astype(jnp.float32), delta.astype(jnp.float32))
    return gain.astype(jnp.float32) * jax.nn.softplus(proj)


def dynamic_mask_select(
    importance: jax.Array, *, heads: int, block: int, top_k: int, num_local: int
) -> BlockSelection:
    """Per query block: the local band plus the `top_k` earlier kv blocks of highest importance.

    Args:
      importance: [batch, length, kv_heads] per-key importance.
      heads: query heads (`heads % kv_heads == 0`).
      block: query and kv block size.
      top_k: routed blocks per query block (clamped to the number of blocks).
      num_local: blocks of the local band, own block included (>= 1).

    Returns:
      A `BlockSelection` with per-head masks `[batch, heads, blocks, blocks]`.
    """
    batch, length, kv_heads = importance.shape
    blocks = length // block
    per_block = importance.reshape(batch, blocks, block, kv_heads).max(axis=2)
    per_block = expand_kv_heads(per_block[..., None], heads)[..., 0]  # [b, blocks, heads]
    scores = jnp.broadcast_to(
        per_block.transpose(0, 2, 1)[:, :, None, :], (batch, heads, blocks, blocks)
    )
    band = local_band(blocks, blocks, block, block, num_local)
    eligible = past_blocks(blocks, blocks, block, block) & ~band
    return select_top_k(scores, eligible, top_k, band)


def append_key_bias(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, scale: float, pad_to: int = 8
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Folds an additive per-key logit bias into the head dimension so an attention op without a
    bias input computes `scale * q.k + bias_j`: q gains a 1 and k gains `bias_j / scale`
    (values gain 0), zero-padded so the head dimension stays a multiple of `pad_to`.

    Args:
      q: [batch, length, heads, d]; k, v: [batch, length, kv_heads, d].
      bias: [batch, length, kv_heads].
      scale: the logit scale the attention op is called with.

    Returns:
      (q, k, v) with head dimension `d + pad`; drop the extra output features after attention.
    """
    extra = pad_to - q.shape[-1] % pad_to  # in [1, pad_to]: room for the bias column
    zeros = [(0, 0)] * 3 + [(0, extra - 1)]
    one = jnp.ones(q.shape[:-1] + (1,), q.dtype)
    q_aug = jnp.pad(jnp.concatenate([q, one], axis=-1), zeros)
    k_bias = (bias / scale).astype(k.dtype)[..., None]
    k_aug = jnp.pad(jnp.concatenate([k, k_bias], axis=-1), zeros)
    v_aug = jnp.pad(v, [(0, 0)] * 3 + [(0, extra)])
    return q_aug, k_aug, v_aug


@dataclasses.dataclass(frozen=True)
class DynamicMaskOptions(KindOptions):
    """top_k: blocks of highest importance per query block besides the local band (clamped to
    the blocks before it); window: tokens of the local band, rounded out to whole blocks."""

    top_k: int = 3
    window: int = 256

    def __post_init__(self) -> None:
        require_at_least(self, ("top_k", "window"), 1)


def init_dynamic_mask_params(key: jax.Array, shape: HeadShape, options: KindOptions) -> Params:
    """`dma_delta [kv_heads, head_dim]` (scaled normal) and `dma_gain [kv_heads]` (ones)."""
    delta = jax.random.normal(key, (shape.num_kv_heads, shape.head_dim)) * shape.head_dim**-0.5
    return {"dma_delta": delta, "dma_gain": jnp.ones((shape.num_kv_heads,))}


def dynamic_mask_plan(
    *,
    length: int,
    block_size: int,
    options: DynamicMaskOptions,
    values: jax.Array,
    num_heads: int,
    params: Params,
) -> AttentionPlan:
    """The local band plus the top-k most important blocks; the importance is also the plan's
    `key_bias`, through which `dma_delta` and `dma_gain` learn."""
    importance = key_importance(values, params["dma_delta"], params["dma_gain"])
    top_k = clamp_top_k(options.top_k, length, block_size)
    band = num_local(options.window, block_size)
    selection = dynamic_mask_select(
        importance, heads=num_heads, block=block_size, top_k=top_k, num_local=band
    )
    return routed_plan(selection, block_size, block_size, top_k + band, key_bias=importance)


DYNAMIC_MASK = register(
    AttentionKindSpec(
        "dynamic_mask",
        dynamic_mask_plan,
        needs=("values", "num_heads", "params"),
        options=DynamicMaskOptions,
        init_params=init_dynamic_mask_params,
        param_axes={"dma_delta": ("kv_heads", "head_dim"), "dma_gain": ("kv_heads",)},
    )
)
