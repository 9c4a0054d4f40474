"""Routers that keep state between steps, updated outside the gradient.

Two routers, each a pure routing function plus a pure state update:

- `bias_balanced`: auxiliary-loss-free balancing (Wang et al., 2024, "Auxiliary-Loss-Free Load
  Balancing Strategy for Mixture-of-Experts", as used in DeepSeek-V3). A per-expert bias is added
  to the scores for *selection only*; after each training step the bias of overloaded experts
  goes down and of underloaded experts up by a fixed rate times the sign of the load error.
- `kmeans`: a parameter-free online k-means router (Geometric Coupling / "Mixture of Experts
  with online k-means"-style): each expert keeps a running mean (centroid) of the normalised
  hidden states routed to it; a token goes to its most cosine-similar centroids.

`STATEFUL_ROUTERS` describes each one's state (shape, initial value, logical axes) and how to
update it, so the MoE layer handles both through one code path.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moejax.routers._common import active_load_balance_loss, require
from moejax.routing import Routing, check_router_inputs, register_router, router_z_loss


@register_router("bias_balanced")
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


def _normalise(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


@register_router("kmeans")
def kmeans_router(
    router_logits: jax.Array,
    *,
    top_k: int,
    renormalize: bool = True,
    hidden: jax.Array | None = None,
    centroids: jax.Array | None = None,
    temperature: float = 0.1,
) -> Routing:
    """Routes each token to the `top_k` centroids most cosine-similar to its hidden state.

    Parameter-free: the learned router logits are ignored (only their shape is used), so the
    layer's router weights get no gradient from this router.

    Args:
      router_logits: [tokens, experts]; only the shape is read.
      top_k: experts per token.
      renormalize: combine weights are a softmax over the chosen similarities / temperature
        (True) or over all experts' (False).
      hidden: [tokens, d_model] hidden states (required).
      centroids: [experts, d_model] running means (required).
      temperature: softmax temperature on cosine similarities, > 0.

    Returns:
      A `Routing` whose router_probs are the softmax of similarities / temperature.
    """
    check_router_inputs(router_logits, top_k)
    num_tokens, num_experts = router_logits.shape
    require(
        hidden is not None and hidden.shape[0] == num_tokens,
        "hidden",
        None if hidden is None else hidden.shape,
        f"an array [tokens={num_tokens}, d_model]",
    )
    require(
        centroids is not None and centroids.shape == (num_experts, hidden.shape[-1]),
        "centroids",
        None if centroids is None else centroids.shape,
        f"an array [experts={num_experts}, d_model={hidden.shape[-1]}]",
    )
    require(temperature > 0, "temperature", temperature, "> 0")
    similarity = _normalise(hidden.astype(jnp.float32)) @ _normalise(centroids).T  # [t, e]
    similarity = jax.lax.stop_gradient(similarity)
    probs = jax.nn.softmax(similarity / temperature, axis=-1)  # [tokens, experts]
    top_similarity, expert_index = jax.lax.top_k(similarity, top_k)  # [tokens, top_k]
    if renormalize:
        weights = jax.nn.softmax(top_similarity / temperature, axis=-1)
    else:
        weights = jnp.take_along_axis(probs, expert_index, axis=-1)
    return Routing(
        expert_index=expert_index.astype(jnp.int32),
        combine_weights=weights,
        router_probs=probs,
        aux_losses={
            "load_balance": jnp.float32(0.0),
            "load_balance_unweighted": active_load_balance_loss(probs, weights, expert_index),
            "router_z": jnp.float32(0.0),
        },
    )


def update_centroids(
    centroids: jax.Array, hidden: jax.Array, expert_index: jax.Array, *, momentum: float
) -> jax.Array:
    """Moves each centroid toward the mean normalised hidden state of its top-1 tokens.

    `c_e <- momentum * c_e + (1 - momentum) * mean_{t: top1(t) = e} x_t / |x_t|`; experts that
    received no token keep their centroid (an empty cluster must not collapse to zero).

    Args:
      centroids: [experts, d_model].
      hidden: [tokens, d_model].
      expert_index: [tokens, top_k] int; slot 0 is the top-1 expert.
      momentum: in [0, 1).

    Returns:
      [experts, d_model] float32.
    """
    num_experts = centroids.shape[0]
    top1 = expert_index[:, 0]  # [tokens]
    x = _normalise(hidden.astype(jnp.float32))  # [tokens, d_model]
    sums = jnp.zeros(centroids.shape, jnp.float32).at[top1].add(x)  # [experts, d_model]
    counts = jnp.zeros(num_experts, jnp.float32).at[top1].add(1.0)  # [experts]
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    moved = momentum * centroids + (1.0 - momentum) * means
    return jnp.where((counts > 0)[:, None], moved, centroids)


@dataclasses.dataclass(frozen=True)
class RouterStateSpec:
    """How the MoE layer keeps one stateful router's state.

    `init(key, d_model, num_experts)` gives the initial value, `axes` its logical axis names,
    `inputs(state, hidden)` the router keyword arguments, and `update(state, hidden, routing)`
    the value after a training step.
    """

    init: Callable[[jax.Array, int, int], jax.Array]
    axes: tuple[str | None, ...]
    inputs: Callable[[jax.Array, jax.Array], dict[str, jax.Array]]
    update: Callable[[jax.Array, jax.Array, Routing], jax.Array]


BIAS_UPDATE_RATE = 1e-3
CENTROID_MOMENTUM = 0.99

STATEFUL_ROUTERS: dict[str, RouterStateSpec] = {
    "bias_balanced": RouterStateSpec(
        init=lambda key, d_model, num_experts: jnp.zeros((num_experts,), jnp.float32),
        axes=(None,),
        inputs=lambda state, hidden: {"expert_bias": state},
        update=lambda state, hidden, routing: update_expert_bias(
            state, routing.expert_index, rate=BIAS_UPDATE_RATE
        ),
    ),
    "kmeans": RouterStateSpec(
        init=lambda key, d_model, num_experts: _normalise(
            jax.random.normal(key, (num_experts, d_model), jnp.float32)
        ),
        axes=(None, None),
        inputs=lambda state, hidden: {"centroids": state, "hidden": hidden},
        update=lambda state, hidden, routing: update_centroids(
            state, hidden, routing.expert_index, momentum=CENTROID_MOMENTUM
        ),
    ),
}
