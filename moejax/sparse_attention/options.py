"""The validated choices of one sparse-attention layer."""

from __future__ import annotations

import dataclasses
import math

from kernels_pallas import BSA_IMPLS as IMPLS
from moejax.errors import require_config, require_one_of

KINDS = ("dense", "local", "global_local", "moba", "routing", "bilevel", "dynamic_mask")


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """How `SparseAttention` picks the key blocks each query block attends to.

    kind: one of `KINDS`. dense: causal attention. local: exact sliding window of `window`
      tokens. global_local: the first `num_global` tokens are global, plus a block-granular
      window. moba: top-k blocks by mean-pooled key (MoBA). routing: online k-means clusters
      plus local band (Routing Transformer). bilevel: top-k regions shared by all heads
      (BiFormer). dynamic_mask: top-k blocks by value-derived key importance plus local band,
      importance added to the logits (DMA).
    block_size: kv block (and, except for moba's `query_block_size`, query block) in tokens.
      Sequence lengths must be multiples of it: they are rejected, not padded.
    query_block_size: moba only: query tokens sharing one routing decision (divides
      `block_size`); None means `block_size`, 1 means per-token routing as in the MoBA paper.
    top_k: routed blocks per query block; clamped to the blocks that precede the query block
      (so a large `top_k` means every earlier block: dense).
    window: tokens of the local band (local, global_local, routing, dynamic_mask).
    num_global: global tokens (global_local).
    key_conv_width: taps of the learned causal depthwise key convolution; 0 = none. FlashMoBA
      adds it to MoBA; any kind accepts it, so a dense baseline can have the same keys.
    num_clusters, centroid_momentum: online k-means (routing).
    shared_qk: routing only: keys are the (group-averaged) queries, as the Routing Transformer
      does for causal LMs; the layer then has no key projection. False keeps a separate key
      projection (routing then stays near chance on MQAR: nothing aligns the two).
    flux_router: add a Flux layer router that runs dense attention instead of the sparse kind
      for the sequences it picks; `flux_hidden` router width, `flux_target_full_share` the
      share of full attention its budget loss aims at.
    impl: `kernels_pallas.block_sparse_attention` implementation.
    """

    kind: str = "dense"
    block_size: int = 64
    query_block_size: int | None = None
    top_k: int = 3
    window: int = 256
    num_global: int = 0
    key_conv_width: int = 0
    num_clusters: int = 4
    centroid_momentum: float = 0.99
    shared_qk: bool = True
    flux_router: bool = False
    flux_hidden: int = 32
    flux_target_full_share: float = 0.5
    impl: str = "auto"

    def __post_init__(self) -> None:
        require_one_of("attention.kind", self.kind, KINDS)
        require_one_of("attention.impl", self.impl, IMPLS)
        for name in ("block_size", "top_k", "window", "num_clusters", "flux_hidden"):
            value = getattr(self, name)
            require_config(value >= 1, f"attention.{name}", value, "an int >= 1")
        for name in ("num_global", "key_conv_width"):
            value = getattr(self, name)
            require_config(value >= 0, f"attention.{name}", value, ">= 0")
        qb = self.query_block_size
        require_config(
            qb is None or (qb >= 1 and self.block_size % qb == 0),
            "attention.query_block_size",
            qb,
            f"None or a divisor of attention.block_size={self.block_size}",
        )
        require_config(
            qb is None or self.kind == "moba",
            "attention.query_block_size",
            qb,
            f"None with attention.kind={self.kind!r} (only moba uses it)",
        )
        require_config(
            0.0 <= self.centroid_momentum < 1.0,
            "attention.centroid_momentum",
            self.centroid_momentum,
            "in [0, 1)",
        )
        require_config(
            0.0 <= self.flux_target_full_share <= 1.0,
            "attention.flux_target_full_share",
            self.flux_target_full_share,
            "in [0, 1]",
        )

    @property
    def block_q(self) -> int:
        """Query block of the kernel call."""
        return self.query_block_size or self.block_size

    @property
    def num_local(self) -> int:
        """Blocks in the local band (own block included) covering `window` tokens."""
        return max(1, math.ceil(self.window / self.block_size))

    def check_length(self, length: int) -> None:
        """Rejects sequence lengths the block sizes do not divide (no padding is done)."""
        if length % self.block_size:
            raise ValueError(
                f"sequence length {length} is not a multiple of block_size={self.block_size}: "
                "lengths are rejected, not padded; pad the batch or choose another block_size"
            )
        if self.kind == "global_local" and self.num_global > length:
            raise ValueError(f"num_global={self.num_global} exceeds the sequence length {length}")
