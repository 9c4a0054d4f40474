"""Expert capacity that varies over depth (the top-p router itself is `moejax.routers.top_p`).

Gülmez, "DynaMoE: Dynamic Token-Level Expert Activation with Layer-Wise Adaptive Capacity for
Mixture-of-Experts Neural Networks" (2026) adds schedules that distribute capacity over layers.
"""

import math

import numpy as np

from moejax.routers.base import require

CAPACITY_SCHEDULES = ("uniform", "descending", "ascending", "pyramid")


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
