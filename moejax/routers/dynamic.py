"""A variable number of experts per token, and expert capacity that varies over depth.

Huang et al., "Harder Tasks Need More Experts: Dynamic Routing in MoE Models" (2024): a token
takes experts in order of probability until their cumulative probability reaches a threshold p,
and an entropy penalty keeps the router from spreading its probability to buy more experts.
Gülmez, "DynaMoE: Dynamic Token-Level Expert Activation with Layer-Wise Adaptive Capacity for
Mixture-of-Experts Neural Networks" (2026) adds schedules that distribute capacity over layers.

A token's unused slots keep the next experts in probability order with combine weight exactly 0:
shapes stay static ([tokens, top_k] with top_k the maximum), the dispatch computes those slots
and they contribute nothing.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import entr

from moejax import routing
from moejax.routers._common import active_load_balance_loss, require

CAPACITY_SCHEDULES = ("uniform", "descending", "ascending", "pyramid")


@routing.register_router("top_p")
def top_p_router(
    router_logits: jax.Array,
    *,
    top_k: int,
    renormalize: bool = True,
    top_p: float | jax.Array = 0.4,
) -> routing.Routing:
    """The fewest most-probable experts whose probabilities sum to at least `top_p`.

    Huang et al., "Harder Tasks Need More Experts: Dynamic Routing in MoE Models" (2024). Expert
    j in descending probability order is active when the probabilities before it sum to less
    than `top_p`; so the first expert is always active and a token stops as soon as its
    cumulative probability reaches `top_p`, or at `top_k` experts, the most the static shapes
    hold. The default p = 0.4 is the threshold of the paper's main experiments (check it against
    the paper before quoting it). The paper's combine weights are the raw probabilities
    (`renormalize=False`); renormalising rescales the active ones to sum to 1.

    Args:
      router_logits: [tokens, num_experts], any floating dtype; the math runs in float32.
      top_k: the most experts per token, in [1, num_experts].
      renormalize: rescale the active weights to sum to 1 per token.
      top_p: the cumulative-probability threshold, in (0, 1]; a number or scalar array.

    Returns:
      A `Routing` whose combine weights are exactly 0 in unused slots, with aux_losses
      "load_balance" (over active assignments), "router_z" and "router_entropy" (the paper's
      dynamic loss: mean over tokens of the entropy of router_probs, in nats).
    """
    routing.check_router_inputs(router_logits, top_k)
    if isinstance(top_p, int | float):  # a traced threshold (a schedule) cannot be checked
        require(0.0 < top_p <= 1.0, "top_p", top_p, "in (0, 1]")
    logits = router_logits.astype(jnp.float32)
    router_probs = jax.nn.softmax(logits, axis=-1)  # [tokens, experts]
    top_probs, expert_index = jax.lax.top_k(router_probs, top_k)  # [tokens, top_k]
    mass_before = jnp.cumsum(top_probs, axis=-1) - top_probs  # [tokens, top_k]
    # Slot 0 has mass_before exactly 0 < top_p, so every token keeps at least one expert.
    active = mass_before < top_p  # [tokens, top_k]
    combine_weights = jnp.where(active, top_probs, 0.0)
    if renormalize:
        combine_weights = combine_weights / jnp.sum(combine_weights, axis=-1, keepdims=True)
    expert_index = expert_index.astype(jnp.int32)
    return routing.Routing(
        expert_index=expert_index,
        combine_weights=combine_weights,
        router_probs=router_probs,
        aux_losses={
            "load_balance": active_load_balance_loss(router_probs, combine_weights, expert_index),
            "router_z": routing.router_z_loss(logits),
            "router_entropy": jnp.mean(jnp.sum(entr(router_probs), axis=-1)),
        },
    )


def active_experts(routing_result: routing.Routing) -> jax.Array:
    """[tokens] int32: the slots with nonzero combine weight, i.e. experts a token really uses."""
    return jnp.sum(routing_result.combine_weights != 0, axis=-1, dtype=jnp.int32)


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
