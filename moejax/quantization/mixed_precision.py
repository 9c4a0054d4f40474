"""Structure-aware bit widths for a MoE layer (QuantMoE-Bench: Li et al., "Examining
Post-Training Quantization for Mixture-of-Experts: A Benchmark", 2024): every token passes the
shared experts and the router, so they get more bits than the routed experts, and among routed
experts the most often chosen ones may get more than the rest.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moejax.errors import require
from moejax.quantization.fake_quant import MAX_BITS, MIN_BITS


@dataclasses.dataclass(frozen=True)
class BitAllocation:
    """Bits per weight kind of one MoE layer: `router` (None keeps it float), `shared` (every
    `shared_w_*`), `routed` (one entry per routed expert, for its `w_gate`, `w_up`, `w_down`)."""

    router: int | None
    shared: int
    routed: tuple[int, ...]

    def bits_of(self, name: str) -> int | None | tuple[int, ...]:
        """The bits of a MoE weight by its name in `moejax.models.moe_layer.MoELayer`: an int,
        None (float) for the router kept float, or per expert for routed weights."""
        if name == "router":
            return self.router
        if name.startswith("shared_w_"):
            return self.shared
        require(name in ("w_gate", "w_up", "w_down"), "name", name, "a MoE weight name")
        return self.routed


def _check_bits(field: str, bits: int | None, optional: bool = False) -> None:
    ok = (optional and bits is None) or (isinstance(bits, int) and MIN_BITS <= bits <= MAX_BITS)
    allowed = f"an int in {MIN_BITS}..{MAX_BITS}" + (" or None (float)" if optional else "")
    require(ok, field, bits, allowed)


def bit_allocation(
    num_experts: int,
    *,
    shared: int = 8,
    routed: int = 4,
    router: int | None = 8,
    expert_counts: np.ndarray | None = None,
    frequent_share: float = 0.0,
    frequent_bits: int | None = None,
) -> BitAllocation:
    """QuantMoE-Bench's structure-aware allocation: `shared` bits for the shared experts,
    `router` for the router (None: kept float), `routed` for each of `num_experts` routed
    experts; with `expert_counts [num_experts]` (how many calibration tokens chose each) the
    `round(frequent_share * num_experts)` most chosen experts get `frequent_bits` (default
    `routed + 1`) instead. Ties in counts go to the lower expert index."""
    require(
        isinstance(num_experts, int) and num_experts >= 1, "num_experts", num_experts, "an int >= 1"
    )
    _check_bits("shared", shared)
    _check_bits("routed", routed)
    _check_bits("router", router, optional=True)
    require(0.0 <= frequent_share <= 1.0, "frequent_share", frequent_share, "a share in [0, 1]")
    bits = np.full(num_experts, routed, int)
    promoted = round(frequent_share * num_experts)
    if promoted:
        require(
            expert_counts is not None and np.shape(expert_counts) == (num_experts,),
            "expert_counts",
            None if expert_counts is None else np.shape(expert_counts),
            f"[num_experts={num_experts}] token counts when frequent_share > 0",
        )
        frequent_bits = routed + 1 if frequent_bits is None else frequent_bits
        _check_bits("frequent_bits", frequent_bits)
        order = np.argsort(-np.asarray(expert_counts), kind="stable")
        bits[order[:promoted]] = frequent_bits
    return BitAllocation(router=router, shared=shared, routed=tuple(int(b) for b in bits))
