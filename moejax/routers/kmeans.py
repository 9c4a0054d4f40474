"""A parameter-free online k-means router.

Geometric Coupling / "Mixture of Experts with online k-means"-style: each expert keeps a running
mean (centroid) of the normalised hidden states routed to it, the router's state updated outside
the gradient; a token goes to its most cosine-similar centroids.
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
from moejax.routers.losses import active_load_balance_loss

CENTROID_MOMENTUM = 0.99


def _normalise(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


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


SPEC = register(
    RouterSpec(
        "kmeans",
        kmeans_router,
        needs=("router_logits", "hidden"),
        options=TopKOptions,
        state=RouterStateSpec(
            argument="centroids",
            init=lambda key, d_model, num_experts: _normalise(
                jax.random.normal(key, (num_experts, d_model), jnp.float32)
            ),
            axes=(None, None),
            update=lambda state, hidden, routing: update_centroids(
                state, hidden, routing.expert_index, momentum=CENTROID_MOMENTUM
            ),
        ),
    )
)
