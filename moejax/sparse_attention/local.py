"""The `local` kind: exact causal sliding-window attention."""

from __future__ import annotations

import dataclasses

from moejax.sparse_attention import masks
from moejax.sparse_attention._plans import require_at_least, static_plan
from moejax.sparse_attention.base import AttentionKindSpec, AttentionPlan, KindOptions, register


@dataclasses.dataclass(frozen=True)
class LocalOptions(KindOptions):
    """window: each token attends to itself and the `window - 1` tokens before it."""

    window: int = 256

    def __post_init__(self) -> None:
        require_at_least(self, ("window",), 1)


def local_plan(*, length: int, block_size: int, options: LocalOptions) -> AttentionPlan:
    """The blocks the window reaches, with the exact token window as a kernel flag."""
    pattern = masks.sliding_window(length, block_size, block_size, options.window)
    return static_plan(pattern, block_size)


LOCAL = register(AttentionKindSpec("local", local_plan, options=LocalOptions))
