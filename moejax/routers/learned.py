"""Routers that own parameters: pure functions of (hidden states, router params), not of logits.

Three families, each an `init_<name>_params(key, d_model, num_experts, **options) -> params` and a
`<name>(hidden [tokens, d_model], params, *, top_k, **options) -> Routing`:

- `cosine_router`: cosine similarity to learned expert centroids in a low-dimensional space, with
  a learned temperature (X-MoE; the cosine family of "Equifinality in Mixture of Experts").
- `relu_router`: ReLU then RMSNorm, a differentiable router whose number of active experts varies
  per token, with the token- and chunk-level sparsity objectives of BlockFFN.
- `recurrent_router`: a GRU state carried from layer to layer (RMoE); it also takes and returns the
  recurrent state, so its signature has one more argument and one more result.

`LEARNED_ROUTERS` maps each name to `(init_fn, route_fn)` and `PARAM_AXES` gives the logical axis
names of every parameter, so an NNX layer can wrap each array as
`moejax.sharding.param(params[name], PARAM_AXES[router][name])`. The expert dimension of router
parameters stays unsharded (None), like `MoELayer.router`: every shard needs all logits for top-k.
All routing math runs in float32, whatever the dtype of the hidden states or parameters.
"""

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moejax import routing
from moejax.routers._common import active_load_balance_loss, require

Params = dict[str, jax.Array]

# X-MoE initialises its learned temperature at 0.07 (the constant TEMPERATURE_FOR_L_UAX of its
# torchscale code; CLIP's value). The clamp keeps 1/temperature <= 100, as CLIP clamps its logit
# scale, and stops the temperature growing into uniform routing.
COSINE_INIT_TEMPERATURE = 0.07
COSINE_MIN_TEMPERATURE = 0.01
COSINE_MAX_TEMPERATURE = 1.0

# The RMoE reference code shares one GRU cell across all layers while each layer keeps its own
# input projection and output matrix; these are the keys of that shared cell.
GRU_PARAM_NAMES = ("gru_w_x", "gru_w_h", "gru_b_x", "gru_b_h")

# Router weights start near uniform (std 0.02, as `MoELayer.router` and the BlockFFN and RMoE
# reference code do): their logits decide discrete assignments.
_ROUTER_INIT_STD = 0.02


def _check_hidden(hidden: jax.Array, weight: jax.Array, weight_name: str) -> None:
    """Validates hidden [tokens, d_model] against a parameter whose first dimension is d_model."""
    require(hidden.ndim == 2, "hidden", f"shape {hidden.shape}", "[tokens, d_model]")
    require(
        hidden.shape[1] == weight.shape[0],
        "hidden",
        f"shape {hidden.shape}",
        f"[tokens, d_model={weight.shape[0]}] to match params[{weight_name!r}] {weight.shape}",
    )


def _check_int(value: object, field: str, minimum: int = 1) -> None:
    require(isinstance(value, int) and value >= minimum, field, value, f"an int >= {minimum}")


def _check_top_k(top_k: int, num_experts: int) -> None:
    require(
        isinstance(top_k, int) and 1 <= top_k <= num_experts,
        "top_k",
        top_k,
        f"an int with 1 <= top_k <= num_experts={num_experts}",
    )


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
    _check_int(d_model, "d_model")
    _check_int(num_experts, "num_experts")
    _check_int(d_space, "d_space")
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
    _check_hidden(hidden, params["w_proj"], "w_proj")
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
) -> routing.Routing:
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
    _check_top_k(top_k, params["centroids"].shape[0])
    logits = cosine_logits(
        hidden, params, min_temperature=min_temperature, max_temperature=max_temperature
    )  # [tokens, experts]
    return routing.softmax_top_k(logits, top_k=top_k, renormalize=renormalize)


# --------------------------------------------------------------------------------------------
# ReLU + RMSNorm router (BlockFFN)


def init_relu_router_params(key: jax.Array, d_model: int, num_experts: int) -> Params:
    """Parameters of `relu_router`.

    Returns:
      "w_router": [d_model, num_experts] float32, normal with std 0.02;
      "norm_scale": [num_experts] float32, ones (the RMSNorm gain).
    """
    _check_int(d_model, "d_model")
    _check_int(num_experts, "num_experts")
    return {
        "w_router": jax.random.normal(key, (d_model, num_experts), jnp.float32) * _ROUTER_INIT_STD,
        "norm_scale": jnp.ones((num_experts,), jnp.float32),
    }


def relu_router_activations(
    hidden: jax.Array, params: Params, eps: float = 1e-6
) -> tuple[jax.Array, jax.Array]:
    """BlockFFN router activations `RMSNorm(ReLU(hidden @ w_router))`.

    Song et al., "BlockFFN: Towards End-Side Acceleration-Friendly Mixture-of-Experts with
    Chunk-Level Activation Sparsity" (2025). The norm comes after the ReLU (as in the reference
    code, `norm_after_router="rms"`), so an expert the ReLU switches off stays exactly 0, and a
    token whose activations are all 0 stays all 0 (0 * rsqrt(eps) = 0, with a finite gradient).

    Args:
      hidden: [tokens, d_model].
      params: from `init_relu_router_params`.
      eps: RMSNorm epsilon.

    Returns:
      (relu [tokens, experts] >= 0, the raw ReLU outputs; activations [tokens, experts], the
      RMSNorm of relu, which the experts are weighted by).
    """
    _check_hidden(hidden, params["w_router"], "w_router")
    scores = hidden.astype(jnp.float32) @ params["w_router"].astype(jnp.float32)  # [t, experts]
    relu = jax.nn.relu(scores)
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(relu), axis=-1, keepdims=True) + eps)  # [t, 1]
    return relu, relu * inv_rms * params["norm_scale"].astype(jnp.float32)


def activation_distribution(relu: jax.Array) -> jax.Array:
    """`relu / sum_e relu` per token: [tokens, experts] -> [tokens, experts], rows sum to 1 or 0.

    The per-token RMS factor cancels in this ratio, so it equals the reference code's
    `router_score_scaled` whatever the norm. A token with no active expert gets a zero row.
    """
    total = jnp.sum(relu, axis=-1, keepdims=True)  # [tokens, 1]
    return relu / jnp.where(total > 0, total, 1.0)


def l1_activation_loss(activations: jax.Array) -> jax.Array:
    """Token-level sparsity regulariser: mean over tokens of `sum_e |activation_e|`.

    BlockFFN regularises the L1 norm of the router activations (its code sums over all tokens
    and multiplies by 1e-8; a mean over tokens keeps the weight independent of the batch). After
    RMSNorm a token's activations have RMS |gain|, so this is an L1/L2 ratio: it falls as the
    activations get fewer and larger, and also when the gain shrinks.

    Args:
      activations: [tokens, experts].

    Returns:
      scalar float32.
    """
    return jnp.mean(jnp.sum(jnp.abs(activations.astype(jnp.float32)), axis=-1))


def chunk_sparsification_loss(
    probs: jax.Array, *, seq_len: int | None = None, chunk_size: int = 8, eps: float = 1e-5
) -> jax.Array:
    """BlockFFN's chunk sparsification loss: the mean probability an expert is used by a chunk.

    Song et al., "BlockFFN: Towards End-Side Acceleration-Friendly Mixture-of-Experts with
    Chunk-Level Activation Sparsity" (2025). Reading each token's activation share `p_{i,e}` as the
    probability that token i uses expert e, independently, expert e is used somewhere in a chunk
    of L tokens with probability `1 - prod_i (1 - p_{i,e})`; the loss is that probability averaged
    over chunks and experts, computed as `1 - mean exp(sum_i log(1 - p_{i,e} + eps))` as the
    reference code does. It is a differentiable stand-in for 1 - chunk-level sparsity.

    Chunks never cross a sequence boundary; a trailing partial chunk of a sequence is left out,
    as `moejax.metrics.chunk_union_sizes` does.

    Args:
      probs: [tokens, experts], each row in [0, 1] (`activation_distribution`); tokens are
        sequences of `seq_len` laid end to end.
      seq_len: tokens per sequence; None means all tokens are one sequence.
      chunk_size: tokens per chunk (L; BlockFFN reports 8-token CLS), 1 <= chunk_size <= seq_len.
      eps: keeps the log finite where p = 1.

    Returns:
      scalar float32.
    """
    tokens, num_experts = probs.shape
    seq_len = tokens if seq_len is None else seq_len
    _check_int(seq_len, "seq_len")
    require(tokens % seq_len == 0, "seq_len", seq_len, f"a divisor of tokens={tokens}")
    require(
        isinstance(chunk_size, int) and 1 <= chunk_size <= seq_len,
        "chunk_size",
        chunk_size,
        f"an int with 1 <= chunk_size <= seq_len={seq_len}",
    )
    num_chunks = seq_len // chunk_size
    sequences = probs.astype(jnp.float32).reshape(tokens // seq_len, seq_len, num_experts)
    chunks = sequences[:, : num_chunks * chunk_size].reshape(
        -1, num_chunks, chunk_size, num_experts
    )  # [batch, chunks, chunk_size, experts]
    log_unused = jnp.sum(jnp.log(1.0 - chunks + eps), axis=2)  # [batch, chunks, experts]
    return 1.0 - jnp.mean(jnp.exp(log_unused))


def relu_router(
    hidden: jax.Array,
    params: Params,
    *,
    top_k: int | None = None,
    renormalize: bool = False,
    seq_len: int | None = None,
    chunk_size: int = 8,
) -> routing.Routing:
    """BlockFFN's ReLU + RMSNorm router: a variable number of experts per token.

    Song et al., "BlockFFN: Towards End-Side Acceleration-Friendly Mixture-of-Experts with
    Chunk-Level Activation Sparsity" (2025). Expert e is active for a token when its ReLU output
    is positive. The `top_k` slots hold the experts with the largest ReLU outputs; a slot whose
    expert is inactive has combine weight exactly 0, so the number of experts used varies per
    token (from 0 to top_k). With top_k = num_experts no active expert is ever dropped.

    Args:
      hidden: [tokens, d_model], any floating dtype.
      params: from `init_relu_router_params`.
      top_k: slots per token, the most experts a token can use, in [1, num_experts]; None means
        num_experts.
      renormalize: combine weights are the active experts' shares of the token's activation (sum
        to 1) instead of the RMSNorm outputs the paper weights experts by.
      seq_len: tokens per sequence, for the chunk objective; None means one sequence.
      chunk_size: tokens per chunk of the chunk objective.

    Returns:
      A `Routing` whose router_probs are the activation shares (rows sum to 1, or 0 for a token
      with no active expert) and whose aux_losses are "load_balance" (BlockFFN's: over active
      assignments, with the shares as importance), "router_z" (0.0: there are no logits),
      "relu_sparsity" (`l1_activation_loss`) and "chunk_sparsity_loss"
      (`chunk_sparsification_loss`).
    """
    num_experts = params["w_router"].shape[1]
    top_k = num_experts if top_k is None else top_k
    _check_top_k(top_k, num_experts)
    relu, activations = relu_router_activations(hidden, params)  # [tokens, experts] each
    probs = activation_distribution(relu)  # [tokens, experts]
    top_relu, expert_index = jax.lax.top_k(relu, top_k)  # [tokens, top_k]
    active = top_relu > 0  # [tokens, top_k]
    weights = probs if renormalize else activations
    chosen = jnp.take_along_axis(weights, expert_index, axis=-1)  # [tokens, top_k]
    # where, not multiply: a negative gain times 0 would give -0.0, and an unused slot must hold
    # exactly 0.
    combine_weights = jnp.where(active, chosen, 0.0)
    expert_index = expert_index.astype(jnp.int32)
    return routing.Routing(
        expert_index=expert_index,
        combine_weights=combine_weights,
        router_probs=probs,
        aux_losses={
            "load_balance": active_load_balance_loss(probs, combine_weights, expert_index),
            "router_z": jnp.zeros((), jnp.float32),
            "relu_sparsity": l1_activation_loss(activations),
            "chunk_sparsity_loss": chunk_sparsification_loss(
                probs, seq_len=seq_len, chunk_size=chunk_size
            ),
        },
    )


# --------------------------------------------------------------------------------------------
# Layerwise recurrent router (RMoE)


def init_gru_params(key: jax.Array, d_state: int) -> Params:
    """Parameters of `gru_cell`, gates stacked in the order (reset, update, candidate).

    Returns:
      "gru_w_x", "gru_w_h": [d_state, 3 * d_state] float32, normal with std 0.02;
      "gru_b_x", "gru_b_h": [3 * d_state] float32, zeros.
    """
    _check_int(d_state, "d_state")
    key_x, key_h = jax.random.split(key)
    shape = (d_state, 3 * d_state)
    return {
        "gru_w_x": jax.random.normal(key_x, shape, jnp.float32) * _ROUTER_INIT_STD,
        "gru_w_h": jax.random.normal(key_h, shape, jnp.float32) * _ROUTER_INIT_STD,
        "gru_b_x": jnp.zeros((3 * d_state,), jnp.float32),
        "gru_b_h": jnp.zeros((3 * d_state,), jnp.float32),
    }


def gru_cell(params: Params, h_prev: jax.Array, x_proj: jax.Array) -> jax.Array:
    """One GRU step, as PyTorch's `GRUCell` (and RMoE's) computes it.

    Cho et al., "Learning Phrase Representations using RNN Encoder-Decoder for Statistical
    Machine Translation" (2014), in the variant that applies the reset gate after the recurrent
    matmul:

        r = sigmoid(x W_xr + b_xr + h W_hr + b_hr)
        z = sigmoid(x W_xz + b_xz + h W_hz + b_hz)
        n = tanh(x W_xn + b_xn + r * (h W_hn + b_hn))
        h' = (1 - z) * n + z * h

    Args:
      params: the `GRU_PARAM_NAMES` keys of `init_gru_params` (other keys are ignored).
      h_prev: [tokens, d_state].
      x_proj: [tokens, d_state].

    Returns:
      [tokens, d_state] float32.
    """
    d_state = params["gru_w_h"].shape[0]
    for name, value in (("h_prev", h_prev), ("x_proj", x_proj)):
        require(
            value.ndim == 2 and value.shape[1] == d_state,
            name,
            f"shape {value.shape}",
            f"[tokens, d_state={d_state}]",
        )
    h_prev = h_prev.astype(jnp.float32)
    gates_x = x_proj.astype(jnp.float32) @ params["gru_w_x"].astype(jnp.float32)  # [t, 3 * s]
    gates_x = gates_x + params["gru_b_x"].astype(jnp.float32)
    gates_h = h_prev @ params["gru_w_h"].astype(jnp.float32)  # [t, 3 * s]
    gates_h = gates_h + params["gru_b_h"].astype(jnp.float32)
    x_r, x_z, x_n = jnp.split(gates_x, 3, axis=-1)  # [t, s] each
    h_r, h_z, h_n = jnp.split(gates_h, 3, axis=-1)
    reset = jax.nn.sigmoid(x_r + h_r)
    update = jax.nn.sigmoid(x_z + h_z)
    candidate = jnp.tanh(x_n + reset * h_n)
    return (1.0 - update) * candidate + update * h_prev


def init_recurrent_router_params(
    key: jax.Array, d_model: int, num_experts: int, *, d_state: int = 256
) -> Params:
    """Parameters of `recurrent_router` for one layer.

    Args:
      key: a PRNG key.
      d_model: width of the hidden states.
      num_experts: number of experts.
      d_state: width of the recurrent routing state; 256 is the default
        `moe_router_rnn_hidden_size` of the RMoE reference code.

    Returns:
      "w_proj": [d_model, d_state] and "w_out": [d_state, num_experts], float32, normal with std
      0.02 (per layer in RMoE); plus the `GRU_PARAM_NAMES` keys of `init_gru_params` (one cell
      shared by all layers in RMoE: a model that shares it overwrites these keys with its own).
    """
    _check_int(d_model, "d_model")
    _check_int(num_experts, "num_experts")
    _check_int(d_state, "d_state")
    key_proj, key_out, key_gru = jax.random.split(key, 3)
    return {
        "w_proj": jax.random.normal(key_proj, (d_model, d_state), jnp.float32) * _ROUTER_INIT_STD,
        "w_out": jax.random.normal(key_out, (d_state, num_experts), jnp.float32) * _ROUTER_INIT_STD,
        **init_gru_params(key_gru, d_state),
    }


def recurrent_router(
    hidden: jax.Array,
    params: Params,
    state_prev: jax.Array | None,
    *,
    top_k: int,
    renormalize: bool = True,
) -> tuple[routing.Routing, jax.Array]:
    """Softmax top-k over logits read from a GRU state carried across layers.

    Qiu et al., "Layerwise Recurrent Router for Mixture-of-Experts" (RMoE, 2024): layer l
    projects its hidden states to `x = hidden @ w_proj`, updates the routing state
    `h_l = GRU(x, h_{l-1})` with `h_0 = 0`, and routes by `logits = h_l @ w_out`. Each token has
    its own state; the recurrence runs over depth, not over the sequence, so tokens stay parallel.

    Args:
      hidden: [tokens, d_model], any floating dtype.
      params: from `init_recurrent_router_params`.
      state_prev: [tokens, d_state], the previous MoE layer's new state; None (or zeros) for
        the first MoE layer.
      top_k: experts per token, in [1, num_experts].
      renormalize: rescale the chosen probabilities to sum to 1 per token.

    Returns:
      (a `Routing` with aux_losses "load_balance" and "router_z", as `softmax_top_k`;
      the new state [tokens, d_state] float32, for the next MoE layer).
    """
    _check_top_k(top_k, params["w_out"].shape[1])
    _check_hidden(hidden, params["w_proj"], "w_proj")
    tokens, d_state = hidden.shape[0], params["w_proj"].shape[1]
    if state_prev is None:
        state_prev = jnp.zeros((tokens, d_state), jnp.float32)
    require(
        state_prev.shape == (tokens, d_state),
        "state_prev",
        f"shape {state_prev.shape}",
        f"None or [tokens={tokens}, d_state={d_state}]",
    )
    x_proj = hidden.astype(jnp.float32) @ params["w_proj"].astype(jnp.float32)  # [tokens, s]
    state = gru_cell(params, state_prev, x_proj)  # [tokens, d_state]
    logits = state @ params["w_out"].astype(jnp.float32)  # [tokens, experts]
    return routing.softmax_top_k(logits, top_k=top_k, renormalize=renormalize), state


LearnedRouter = tuple[Callable[..., Params], Callable[..., object]]

LEARNED_ROUTERS: dict[str, LearnedRouter] = {
    "cosine": (init_cosine_router_params, cosine_router),
    "relu_rmsnorm": (init_relu_router_params, relu_router),
    "recurrent": (init_recurrent_router_params, recurrent_router),
}

_GRU_AXES: dict[str, tuple[str | None, ...]] = {
    "gru_w_x": (None, None),
    "gru_w_h": (None, None),
    "gru_b_x": (None,),
    "gru_b_h": (None,),
}

PARAM_AXES: dict[str, dict[str, tuple[str | None, ...]]] = {
    "cosine": {"w_proj": ("embed", None), "centroids": (None, None), "log_temperature": ()},
    "relu_rmsnorm": {"w_router": ("embed", None), "norm_scale": (None,)},
    "recurrent": {"w_proj": ("embed", None), "w_out": (None, None), **_GRU_AXES},
}
