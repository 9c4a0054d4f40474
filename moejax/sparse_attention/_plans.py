"""Helpers the kind files share: option checks, and plans from a static pattern or a routed
`BlockSelection`."""

from __future__ import annotations

import math

from moejax.errors import require_config
from moejax.sparse_attention.base import AttentionPlan, KindOptions
from moejax.sparse_attention.masks import BlockPattern
from moejax.sparse_attention.selection import BlockSelection


def require_at_least(options: KindOptions, names: tuple[str, ...], minimum: int) -> None:
    """ConfigError naming `attention.options.<name>` for a field below `minimum`."""
    for name in names:
        value = getattr(options, name)
        require_config(value >= minimum, f"attention.options.{name}", value, f">= {minimum}")


def num_local(window: int, block_size: int) -> int:
    """Blocks in the local band (own block included) covering `window` tokens."""
    return max(1, math.ceil(window / block_size))


def clamp_top_k(top_k: int, length: int, block_size: int) -> int:
    """A query block can only route to the kv blocks strictly before its own."""
    return min(top_k, max(length // block_size - 1, 1))


def static_plan(pattern: BlockPattern, block_size: int) -> AttentionPlan:
    """The plan of a fixed pattern, its mask kept as host data: the kernel derives its visit
    lists from a concrete mask."""
    return AttentionPlan(
        pattern.block_mask[None, None],
        block_size,
        block_size,
        pattern.max_kv_blocks,
        window=pattern.window,
    )


def routed_plan(
    selection: BlockSelection, block_q: int, block_kv: int, bound: int, **extra
) -> AttentionPlan:
    """The plan of a content-routed selection visiting at most `bound` kv blocks per query
    block (capped by the number of kv blocks)."""
    kv_blocks = selection.block_mask.shape[-1]
    return AttentionPlan(
        selection.block_mask,
        block_q,
        block_kv,
        min(bound, kv_blocks),
        selected=selection.selected,
        **extra,
    )
