"""Selective Sinkhorn routing: balanced transport on a share of the tokens, gates from the plan.

Nguyen et al., "Selective Sinkhorn Routing for Improved Sparse Mixture of Experts" (2025); the
transport plan and the routing on it are shared with `moejax.routers.sinkhorn`.
"""

import jax
import jax.numpy as jnp

from moejax.routers.base import (
    RouterSpec,
    Routing,
    TopKOptions,
    check_router_inputs,
    register,
    require,
)
from moejax.routers.sinkhorn import route_on_plan


def selective_sinkhorn(
    router_logits: jax.Array,
    *,
    top_k: int,
    renormalize: bool = True,
    rng: jax.Array | None = None,
    train: bool = True,
    sinkhorn_fraction: float | jax.Array = 0.5,
    num_iters: int = 20,
    tolerance: float = 1e-6,
    gate_source: str = "plan",
) -> Routing:
    """Transport-plan routing for a share of the tokens, softmax top-k for the rest.

    Nguyen et al., "Selective Sinkhorn Routing for Improved Sparse Mixture of Experts" (2025):
    a minimal degree of Sinkhorn routing, with gating scores read from the transport plan,
    replaces the load-balancing and z-losses, so both are 0.0 here and reported unweighted as
    "load_balance_unweighted" and "router_z_unweighted". The plan is solved over all tokens (its
    marginals describe the batch); each token then follows it with probability
    `sinkhorn_fraction`, drawn from `rng`. Without `rng`, `floor(tokens * sinkhorn_fraction)`
    evenly spaced tokens follow it, deterministically.
    The default fraction 0.5 is this codebase's choice, not a value from the paper.

    Args:
      router_logits: [tokens, num_experts], any floating dtype; the math runs in float32.
      top_k: experts per token, in [1, num_experts].
      renormalize: rescale the chosen gates to sum to 1 per token.
      rng: key that picks the Sinkhorn-routed tokens, or None for the deterministic pattern.
      train: with False every token routes like `softmax_top_k` (see `sinkhorn`).
      sinkhorn_fraction: share of tokens routed by the plan, in [0, 1]; a Python number or a
        scalar array (which may be traced, e.g. a schedule over steps).
      num_iters, tolerance: see `sinkhorn_log_plan`.
      gate_source: "plan" (the paper's) or "softmax", where the combine weights come from.

    Returns:
      A `Routing` with aux_losses "load_balance" and "router_z" (both 0.0),
      "load_balance_unweighted" and "router_z_unweighted".
    """
    # A traced fraction (a schedule over training steps) cannot be checked here.
    if isinstance(sinkhorn_fraction, int | float):
        require(
            0.0 <= sinkhorn_fraction <= 1.0, "sinkhorn_fraction", sinkhorn_fraction, "in [0, 1]"
        )
    check_router_inputs(router_logits, top_k)
    num_tokens = router_logits.shape[0]
    if not train:
        sinkhorn_mask = False
    elif rng is None:
        # Token t is routed by the plan when floor(f * (t + 1)) steps up: an even spread.
        position = jnp.arange(num_tokens, dtype=jnp.float32)
        sinkhorn_mask = jnp.floor(sinkhorn_fraction * (position + 1)) > jnp.floor(
            sinkhorn_fraction * position
        )  # [tokens]
    else:
        sinkhorn_mask = jax.random.bernoulli(rng, sinkhorn_fraction, (num_tokens,))  # [tokens]
    return route_on_plan(
        router_logits,
        top_k=top_k,
        renormalize=renormalize,
        sinkhorn_mask=sinkhorn_mask,
        num_iters=num_iters,
        tolerance=tolerance,
        gate_source=gate_source,
        replaces_z_loss=True,
    )


SPEC = register(
    RouterSpec(
        "selective_sinkhorn",
        selective_sinkhorn,
        needs=("router_logits", "rng", "train"),
        options=TopKOptions,
    )
)
