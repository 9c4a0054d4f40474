"""The `attention` config group: the kind (a name from `moejax.sparse_attention.KINDS`), its
typed options, and the settings every kind shares.

`--config.attention.kind=moba --config.attention.options.top_k=2`: naming a kind starts its
options from that kind's defaults; an option the kind lacks is an error listing the ones it has.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from kernels_pallas import BSA_IMPLS as IMPLS
from moejax.errors import require_config, require_one_of
from moejax.sparse_attention import base
from moejax.sparse_attention.base import AttentionKindSpec, KindOptions


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """How `SparseAttention` picks the key blocks each query block attends to.

    kind: the attention kind, a name from `moejax.sparse_attention.KINDS`: dense (causal),
      local (exact sliding window), global_local (global first tokens plus a block window),
      moba (top-k blocks by mean-pooled key, MoBA), routing (online k-means clusters plus local
      band, Routing Transformer), bilevel (top-k regions shared by all heads, BiFormer),
      dynamic_mask (top-k blocks by value-derived key importance plus local band, DMA).
    options: the kind's own options (`attention.options.*`, e.g. `top_k`, `window`); None: its
      defaults.
    block_size: kv block (and, unless the kind routes smaller query blocks, query block) in
      tokens. Sequence lengths must be multiples of it: they are rejected, not padded.
    key_conv_width: taps of the learned causal depthwise key convolution; 0 = none. FlashMoBA
      adds it to MoBA; any kind accepts it, so a dense baseline can have the same keys.
    flux_router: add a Flux layer router that runs dense attention instead of the kind for the
      sequences it picks; flux_hidden: router width; flux_target_full_share: the share of full
      attention its budget loss aims at.
    impl: `kernels_pallas.block_sparse_attention` implementation.
    """

    kind: str = "dense"
    options: KindOptions | None = None
    block_size: int = 64
    key_conv_width: int = 0
    flux_router: bool = False
    flux_hidden: int = 32
    flux_target_full_share: float = 0.5
    impl: str = "auto"

    # Setting `kind` from the command line starts `options` from the new kind's defaults.
    resets: ClassVar[dict[str, str]] = {"kind": "options"}

    def __post_init__(self) -> None:
        require_one_of("attention.kind", self.kind, list(base.KINDS))
        options_class = self.spec.options
        if self.options is None:
            object.__setattr__(self, "options", options_class())
        require_config(
            type(self.options) is options_class,
            "attention.options",
            self.options,
            f"a {options_class.__name__} (the options of attention kind {self.kind!r})",
        )
        require_one_of("attention.impl", self.impl, IMPLS)
        for name in ("block_size", "flux_hidden"):
            value = getattr(self, name)
            require_config(value >= 1, f"attention.{name}", value, "an int >= 1")
        require_config(
            self.key_conv_width >= 0, "attention.key_conv_width", self.key_conv_width, ">= 0"
        )
        require_config(
            0.0 <= self.flux_target_full_share <= 1.0,
            "attention.flux_target_full_share",
            self.flux_target_full_share,
            "in [0, 1]",
        )
        self.options.check(self.block_size)

    @property
    def spec(self) -> AttentionKindSpec:
        return base.get(self.kind)

    @classmethod
    def of(
        cls, kind: str, *, options: dict[str, Any] | None = None, **shared: Any
    ) -> AttentionConfig:
        """`AttentionConfig(kind, options=<kind's options>(**options), **shared)`, e.g.
        `AttentionConfig.of("moba", options={"top_k": 2}, block_size=16)`."""
        require_one_of("attention.kind", kind, list(base.KINDS))
        return cls(kind=kind, options=base.get(kind).options(**(options or {})), **shared)

    @property
    def block_q(self) -> int:
        """Query block of the kernel call."""
        return self.options.query_block or self.block_size

    @property
    def shares_qk(self) -> bool:
        """True when the keys are the queries (the layer has no key projection)."""
        return self.options.shares_qk

    @property
    def uses_block_kernel(self) -> bool:
        """False when a transformer block can run the dense `moejax.attention.Attention`: a
        full-attention kind with no key convolution and no Flux router."""
        return not self.spec.full_attention or bool(self.key_conv_width) or self.flux_router

    def check_length(self, length: int) -> None:
        """Rejects sequence lengths the block sizes do not divide (no padding is done)."""
        if length % self.block_size:
            raise ValueError(
                f"sequence length {length} is not a multiple of block_size={self.block_size}: "
                "lengths are rejected, not padded; pad the batch or choose another block_size"
            )
        self.options.check_length(length)
