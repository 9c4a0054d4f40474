"""Layerwise recurrent router (RMoE): a GRU routing state carried from layer to layer.

`init_recurrent_router_params` makes one layer's parameters; `recurrent_router(hidden, params,
state_prev, *, top_k) -> (Routing, state)` takes and returns the recurrent state, so its
signature has one more argument and one more result than the other routers.
Routing math runs in float32, whatever the dtype of the hidden states or parameters.
"""

import dataclasses

import jax
import jax.numpy as jnp

from moejax.errors import require_config
from moejax.routers.base import (
    ROUTER_INIT_STD,
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

# The RMoE reference code shares one GRU cell across all layers while each layer keeps its own
# input projection and output matrix; these are the keys of that shared cell.
GRU_PARAM_NAMES = ("gru_w_x", "gru_w_h", "gru_b_x", "gru_b_h")


@dataclasses.dataclass(frozen=True)
class RecurrentOptions(TopKOptions):
    """Options of the recurrent router.

    Attributes:
      state_dim: width of the GRU state carried over depth (RMoE's default 256).
    """

    state_dim: int = 256
    layer_fields = ("state_dim",)

    def __post_init__(self) -> None:
        require_config(
            isinstance(self.state_dim, int) and self.state_dim >= 1,
            "model.router.options.state_dim",
            self.state_dim,
            "an int >= 1",
        )


def init_gru_params(key: jax.Array, d_state: int) -> Params:
    """Parameters of `gru_cell`, gates stacked in the order (reset, update, candidate).

    Returns:
      "gru_w_x", "gru_w_h": [d_state, 3 * d_state] float32, normal with std 0.02;
      "gru_b_x", "gru_b_h": [3 * d_state] float32, zeros.
    """
    check_int(d_state, "d_state")
    key_x, key_h = jax.random.split(key)
    shape = (d_state, 3 * d_state)
    return {
        "gru_w_x": jax.random.normal(key_x, shape, jnp.float32) * ROUTER_INIT_STD,
        "gru_w_h": jax.random.normal(key_h, shape, jnp.float32) * ROUTER_INIT_STD,
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
    check_int(d_model, "d_model")
    check_int(num_experts, "num_experts")
    check_int(d_state, "d_state")
    key_proj, key_out, key_gru = jax.random.split(key, 3)
    return {
        "w_proj": jax.random.normal(key_proj, (d_model, d_state), jnp.float32) * ROUTER_INIT_STD,
        "w_out": jax.random.normal(key_out, (d_state, num_experts), jnp.float32) * ROUTER_INIT_STD,
        **init_gru_params(key_gru, d_state),
    }


def recurrent_router(
    hidden: jax.Array,
    params: Params,
    state_prev: jax.Array | None,
    *,
    top_k: int,
    renormalize: bool = True,
) -> tuple[Routing, jax.Array]:
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
    check_top_k(top_k, params["w_out"].shape[1])
    check_hidden(hidden, params["w_proj"], "w_proj")
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
    return softmax_top_k(logits, top_k=top_k, renormalize=renormalize), state


def _init_layer_params(key: jax.Array, d_model: int, num_experts: int, options) -> Params:
    """One layer's projections; the GRU cell is shared by all layers (as in RMoE)."""
    values = init_recurrent_router_params(key, d_model, num_experts, d_state=options.state_dim)
    return {name: value for name, value in values.items() if name not in GRU_PARAM_NAMES}


def _init_shared_params(key: jax.Array, options) -> Params:
    return init_gru_params(key, options.state_dim)


SPEC = register(
    RouterSpec(
        "recurrent",
        recurrent_router,
        needs=("hidden", "params", "state_prev"),
        options=RecurrentOptions,
        init_params=_init_layer_params,
        init_shared_params=_init_shared_params,
        param_axes={
            "w_proj": ("embed", None),
            "w_out": (None, None),
            **{name: (None,) * (2 if name.startswith("gru_w") else 1) for name in GRU_PARAM_NAMES},
        },
    )
)
