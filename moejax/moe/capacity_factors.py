"""How many slots each expert gets: the capacity of one layer, and capacity factors over depth.

`expert_capacity` turns a capacity factor into slots per expert (GShard); `capacity_schedule`
spreads a mean factor over the MoE layers (DynaMoE); the "capacity" dispatch strategy
(`moejax.moe.capacity`) and the expert choice router read them.
"""

import math
from fractions import Fraction

import numpy as np

from moejax.errors import require

CAPACITY_SCHEDULES = ("uniform", "descending", "ascending", "pyramid")


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: `ceil(num_tokens * top_k * capacity_factor / num_experts)`, at least 1.

    Lepikhin et al., "GShard: Scaling Giant Models with Conditional Computation and Automatic
    Sharding" (2020). `capacity_factor=1` fits a perfectly balanced routing exactly.
    """
    if not (math.isfinite(capacity_factor) and capacity_factor > 0):
        raise ValueError(f"capacity_factor: got {capacity_factor}; allowed: finite and > 0")
    if num_experts < 1:
        raise ValueError(f"num_experts: got {num_experts}; allowed: >= 1")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: got {top_k}; allowed: 1 <= top_k <= num_experts={num_experts}")
    # Fraction(str(.)) reads 1.1 as 11/10, so 10 tokens * 1.1 give 11 slots, not the 12 that
    # float round-off (11.000000000000002) would round up to.
    slots = Fraction(num_tokens * top_k) * Fraction(str(capacity_factor)) / num_experts
    return max(1, math.ceil(slots))


def capacity_schedule(
    num_layers: int, base_capacity_factor: float, kind: str, spread: float = 0.5
) -> tuple[float, ...]:
    """Per-layer capacity factors with mean `base_capacity_factor`, shaped by `kind`.

    Gülmez, "DynaMoE: Dynamic Token-Level Expert Activation with Layer-Wise Adaptive Capacity
    for Mixture-of-Experts Neural Networks" (2026) distributes expert capacity over depth. Four of
    its schedules: "uniform" (the base everywhere), "descending" (most capacity in the first
    layer, falling linearly), "ascending" (the reverse) and "pyramid" (most in the middle,
    falling linearly towards both ends). Layer l gets `base * (1 + spread * s_l)`, where the
    shape s is centred to mean 0 and scaled to max |s| = 1, so the mean over layers is exactly
    the base and the factors stay within base * [1 - spread, 1 + spread].

    Args:
      num_layers: number of MoE layers, >= 1.
      base_capacity_factor: the mean factor, finite and > 0.
      kind: one of `CAPACITY_SCHEDULES`.
      spread: the largest relative deviation from the base, in [0, 1).

    Returns:
      num_layers Python floats, a static config value.
    """
    require(
        isinstance(num_layers, int) and num_layers >= 1, "num_layers", num_layers, "an int >= 1"
    )
    require(
        math.isfinite(base_capacity_factor) and base_capacity_factor > 0,
        "base_capacity_factor",
        base_capacity_factor,
        "finite and > 0",
    )
    require(kind in CAPACITY_SCHEDULES, "kind", kind, ", ".join(CAPACITY_SCHEDULES))
    require(0.0 <= spread < 1.0, "spread", spread, "in [0, 1)")
    # Depth in [-1, 1] from the first layer to the last; float64 so the mean is exact to ~1e-16.
    depth = np.linspace(-1.0, 1.0, num_layers) if num_layers > 1 else np.zeros(1)
    shape = {
        "uniform": np.zeros_like(depth),
        "descending": -depth,
        "ascending": depth,
        "pyramid": -np.abs(depth),
    }[kind]
    shape = shape - shape.mean()
    largest = np.max(np.abs(shape))
    if largest > 0:
        shape = shape / largest
    return tuple(float(base_capacity_factor * (1.0 + spread * s)) for s in shape)
