"""The static configuration of one block-sparse attention call, shared by every implementation."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Everything about a call that is not an array; hashable, so it can be a static argument.

    Query position i is i + kv_len - q_len (positions aligned at the end), which is what
    `causal` and `window` compare against kv positions.
    """

    q_len: int
    kv_len: int
    block_q: int
    block_kv: int
    scale: float
    causal: bool = False
    window: int | None = None
    logit_soft_cap: float | None = None
    max_kv_blocks: int = 1  # width of the visit lists of query blocks
    max_q_blocks: int = 1  # width of the visit lists of kv blocks (backward of k and v)

    @property
    def q_offset(self) -> int:
        """Added to a query index to give its position on the kv axis."""
        return self.kv_len - self.q_len
