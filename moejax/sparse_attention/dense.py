"""The `dense` kind: causal attention over every block (a transformer block runs it as the
dense `moejax.attention.Attention` unless it needs the block kernel, e.g. under a Flux router)."""

from __future__ import annotations

import dataclasses

from moejax.sparse_attention import masks
from moejax.sparse_attention._plans import static_plan
from moejax.sparse_attention.base import AttentionKindSpec, AttentionPlan, KindOptions, register


@dataclasses.dataclass(frozen=True)
class DenseOptions(KindOptions):
    """Dense attention has no options of its own."""


def dense_plan(*, length: int, block_size: int, options: KindOptions) -> AttentionPlan:
    """Every causal block pair: `[1, 1, blocks, blocks]` lower-triangular blocks."""
    return static_plan(masks.causal(length, block_size, block_size), block_size)


DENSE = register(AttentionKindSpec("dense", dense_plan, options=DenseOptions, full_attention=True))
