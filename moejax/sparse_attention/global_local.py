"""The `global_local` kind: the first `num_global` tokens are global (they see and are seen by
every token, causally), plus a block-granular local window (Longformer / BigBird style)."""

from __future__ import annotations

import dataclasses

from moejax.sparse_attention import masks
from moejax.sparse_attention._plans import require_at_least, static_plan
from moejax.sparse_attention.base import AttentionKindSpec, AttentionPlan, KindOptions, register


@dataclasses.dataclass(frozen=True)
class GlobalLocalOptions(KindOptions):
    """window: tokens of the local band, rounded out to whole blocks; num_global: global
    tokens at the start of the sequence."""

    window: int = 256
    num_global: int = 0

    def __post_init__(self) -> None:
        require_at_least(self, ("window",), 1)
        require_at_least(self, ("num_global",), 0)

    def check_length(self, length: int) -> None:
        if self.num_global > length:
            raise ValueError(f"num_global={self.num_global} exceeds the sequence length {length}")


def global_local_plan(
    *, length: int, block_size: int, options: GlobalLocalOptions
) -> AttentionPlan:
    """The global rows and columns plus the local band, as a static block pattern."""
    pattern = masks.global_local(length, block_size, block_size, options.window, options.num_global)
    return static_plan(pattern, block_size)


GLOBAL_LOCAL = register(
    AttentionKindSpec("global_local", global_local_plan, options=GlobalLocalOptions)
)
