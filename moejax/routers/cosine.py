"""Cosine router: cosine similarity to learned expert centroids, with a learned temperature.

X-MoE; the cosine family of "Equifinality in Mixture of Experts". `init_cosine_router_params`
makes the parameters; `cosine_router(hidden [tokens, d_model], params, *, top_k) -> Routing`.
Routing math runs in float32, whatever the dtype of the hidden states or parameters.
"""

import math

import jax
import jax.numpy as jnp

from moejax.routers.base import (
    Params,
    RouterSpec,
    Routing,
    TopKOptions,
    check_hidden,
    check_int,
    check_top_k,
    register,
    require,
)
from moejax.routers.softmax_top_k import softmax_top_k

# X-MoE initialises its learned temperature at 0.07 (the constant TEMPERATURE_FOR_L_UAX of its
# torchscale code; CLIP's value). The clamp keeps 1/temperature <= 100, as CLIP clamps its logit
# scale, and stops the temperature growing into uniform routing.
COSINE_INIT_TEMPERATURE = 0.07
COSINE_MIN_TEMPERATURE = 0.01
COSINE_MAX_TEMPERATURE = 1.0


def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """`x / max(|x|, eps)` along the last axis; the max keeps the gradient finite at x = 0."""
    sum_sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sum_sq, eps * eps))


# --------------------------------------------------------------------------------------------
# Cosine router


def init_cosine_router_params(
    key: jax.Array,
    d_model: int,
    num_experts: int,
    *,
    d_space: int = 64,
    init_temperature: float = COSINE_INIT_TEMPERATURE,
) -> Params:
    """Parameters of `cosine_router`.

    Args:
      key: a PRNG key.
      d_model: width of the hidden states.
      num_experts: number of experts.
      d_space: width of the routing space; 64 in "Equifinality in Mixture of Experts" (X-MoE
        used 16).
      init_temperature: initial temperature, in [COSINE_MIN_TEMPERATURE, COSINE_MAX_TEMPERATURE].

    Returns:
      "w_proj": [d_model, d_space] float32, fan-in scaled;
      "centroids": [num_experts, d_space] float32, orthogonal rows with norm 0.32 as X-MoE
        initialises them (only their direction enters the logits);
      "log_temperature": [] float32, log(init_temperature).
    """
    check_int(d_model, "d_model")
    check_int(num_experts, "num_experts")
    check_int(d_space, "d_space")
    require(
        COSINE_MIN_TEMPERATURE <= init_temperature <= COSINE_MAX_TEMPERATURE,
        "init_temperature",
        init_temperature,
        f"in [{COSINE_MIN_TEMPERATURE}, {COSINE_MAX_TEMPERATURE}]",
    )
    key_proj, key_centroids = jax.random.split(key)
    w_proj = jax.random.normal(key_proj, (d_model, d_space), jnp.float32) / math.sqrt(d_model)
    centroids = jax.nn.initializers.orthogonal(scale=0.32)(
        key_centroids, (num_experts, d_space), jnp.float32
    )
    return {
        "w_proj": w_proj,
        "centroids": centroids,
        "log_temperature": jnp.asarray(math.log(init_temperature), jnp.float32),
    }


def cosine_logits(
    hidden: jax.Array,
    params: Params,
    *,
    min_temperature: float = COSINE_MIN_TEMPERATURE,
    max_temperature: float = COSINE_MAX_TEMPERATURE,
) -> jax.Array:
    """`cos(hidden @ w_proj, centroid_e) / temperature`: [tokens, d_model] -> [tokens, experts].

    Chi et al., "On the Representation Collapse of Sparse Mixture of Experts" (X-MoE, 2022). The
    logits are invariant to the scale of each token and bounded by 1 / temperature in absolute
    value. The temperature is `exp(log_temperature)` clamped to [min_temperature,
    max_temperature]; outside that range the temperature gets no gradient.
    """
    require(
        0.0 < min_temperature <= max_temperature,
        "min_temperature, max_temperature",
        (min_temperature, max_temperature),
        "0 < min_temperature <= max_temperature",
    )
    check_hidden(hidden, params["w_proj"], "w_proj")
    projected = hidden.astype(jnp.float32) @ params["w_proj"].astype(jnp.float32)  # [tokens, s]
    tokens_dir = _l2_normalize(projected)  # [tokens, d_space]
    centroids_dir = _l2_normalize(params["centroids"].astype(jnp.float32))  # [experts, d_space]
    cosine = tokens_dir @ centroids_dir.T  # [tokens, experts]
    log_temperature = jnp.clip(
        params["log_temperature"].astype(jnp.float32),
        math.log(min_temperature),
        math.log(max_temperature),
    )
    return cosine * jnp.exp(-log_temperature)


def cosine_router(
    hidden: jax.Array,
    params: Params,
    *,
    top_k: int,
    renormalize: bool = True,
    min_temperature: float = COSINE_MIN_TEMPERATURE,
    max_temperature: float = COSINE_MAX_TEMPERATURE,
) -> Routing:
    """Softmax top-k over cosine logits to learned expert centroids.

    Chi et al., "On the Representation Collapse of Sparse Mixture of Experts" (X-MoE, 2022);
    the cosine/centroid router of "Equifinality in Mixture of Experts: Routing Topology Does Not
    Determine Language Modeling Quality" projects to d_space = 64.

    Args:
      hidden: [tokens, d_model], any floating dtype.
      params: from `init_cosine_router_params`.
      top_k: experts per token, in [1, num_experts].
      renormalize: rescale the chosen probabilities to sum to 1 per token.
      min_temperature, max_temperature: the clamp on the learned temperature.

    Returns:
      A `Routing` with aux_losses "load_balance" and "router_z" (as `softmax_top_k`).
    """
    check_top_k(top_k, params["centroids"].shape[0])
    logits = cosine_logits(
        hidden, params, min_temperature=min_temperature, max_temperature=max_temperature
    )  # [tokens, experts]
    return softmax_top_k(logits, top_k=top_k, renormalize=renormalize)


def _init_layer_params(key: jax.Array, d_model: int, num_experts: int, options) -> Params:
    return init_cosine_router_params(key, d_model, num_experts)


SPEC = register(
    RouterSpec(
        "cosine",
        cosine_router,
        needs=("hidden", "params"),
        options=TopKOptions,
        init_params=_init_layer_params,
        param_axes={"w_proj": ("embed", None), "centroids": (None, None), "log_temperature": ()},
    )
)
