"""Auxiliary-loss-free load balancing: a per-expert bias that steers the choice only.

Wang et al., "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts" (2024), as used
in DeepSeek-V3. A per-expert bias is added to the scores for *selection only*; after each
training step the bias of overloaded experts goes down and of underloaded experts up by a fixed
rate times the sign of the load error (the router's state, updated outside the gradient).
"""

import jax
import jax.numpy as jnp

from moejax.routers.base import (
    RouterSpec,
    RouterStateSpec,
    Routing,
    TopKOptions,
    check_router_inputs,
    register,
    require,
)
from moejax.routers.losses import active_load_balance_loss, router_z_loss

BIAS_UPDATE_RATE = 1e-3


def bias_balanced_top_k(
    router_logits: jax.Array,
    *,
    top_k: int,
    renormalize: bool = True,
    expert_bias: jax.Array | None = None,
) -> Routing:
    """Top-k by softmax probability plus a per-expert bias; weights from the unbiased
    probabilities.

    Args:
      router_logits: [tokens, experts].
      top_k: experts per token.
      renormalize: rescale the chosen (unbiased) probabilities to sum to 1.
      expert_bias: [experts] float32, added to the probabilities for the choice only; None
        behaves as a zero bias (then this is `softmax_top_k`).

    Returns:
      A `Routing`; "load_balance" is reported for monitoring but the bias, not this loss,
      balances the load (the layer should give it weight 0).
    """
    check_router_inputs(router_logits, top_k)
    logits = router_logits.astype(jnp.float32)
    num_experts = logits.shape[-1]
    probs = jax.nn.softmax(logits, axis=-1)  # [tokens, experts]
    bias = jnp.zeros(num_experts, jnp.float32) if expert_bias is None else expert_bias
    require(bias.shape == (num_experts,), "expert_bias", bias.shape, f"shape ({num_experts},)")
    # The bias only steers the choice: no gradient may flow through it.
    _, expert_index = jax.lax.top_k(probs + jax.lax.stop_gradient(bias), top_k)  # [tokens, k]
    weights = jnp.take_along_axis(probs, expert_index, axis=-1)  # [tokens, top_k]
    if renormalize:
        weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-9)
    return Routing(
        expert_index=expert_index.astype(jnp.int32),
        combine_weights=weights,
        router_probs=probs,
        aux_losses={
            "load_balance": active_load_balance_loss(probs, weights, expert_index),
            "router_z": router_z_loss(logits),
        },
    )


def update_expert_bias(
    expert_bias: jax.Array, expert_index: jax.Array, *, rate: float
) -> jax.Array:
    """`bias + rate * sign(mean load - load)`: the auxiliary-loss-free update.

    Args:
      expert_bias: [experts].
      expert_index: [tokens, top_k] int, this step's assignments.
      rate: the update speed `u` of the paper (1e-3 there).

    Returns:
      [experts] float32, the new bias.
    """
    num_experts = expert_bias.shape[0]
    counts = jnp.zeros(num_experts, jnp.float32).at[expert_index.reshape(-1)].add(1.0)
    return expert_bias + rate * jnp.sign(jnp.mean(counts) - counts)


# The expert bias as router state, updated after each training step (shared by every router
# that steers by a bias: `group_limited_sigmoid` too).
EXPERT_BIAS_STATE = RouterStateSpec(
    argument="expert_bias",
    init=lambda key, d_model, num_experts: jnp.zeros((num_experts,), jnp.float32),
    axes=(None,),
    update=lambda state, hidden, routing: update_expert_bias(
        state, routing.expert_index, rate=BIAS_UPDATE_RATE
    ),
)

SPEC = register(
    RouterSpec("bias_balanced", bias_balanced_top_k, options=TopKOptions, state=EXPERT_BIAS_STATE)
)
