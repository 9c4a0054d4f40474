"""Feed-forward building blocks: RMSNorm, a dense SwiGLU MLP, and the mixture-of-experts layer.

Each module owns its parameters and calls the pure functions of `moejax.routing` and
`moejax.moe`; the math is testable without Flax.
"""

from __future__ import annotations

import dataclasses
import inspect

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import metrics, moe, routing
from moejax.routers.learned import GRU_PARAM_NAMES, LEARNED_ROUTERS, PARAM_AXES
from moejax.routers.stateful import STATEFUL_ROUTERS
from moejax.sharding import constrain, param


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
    """`x [..., d] / rms(x) * scale [d]`, computed in float32, returned in x's dtype.

    Root Mean Square Layer Normalization (Zhang & Sennrich, 2019).
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """`(silu(x @ w_gate) * (x @ w_up)) @ w_down` for `x [..., d]`, `w_gate, w_up [d, f]`.

    GLU Variants Improve Transformer (Shazeer, 2020).
    """
    hidden = jax.nn.silu(x @ w_gate) * (x @ w_up)  # [..., f]
    return hidden @ w_down


# Per-token entries of a MoE layer's aux dict: read by evaluation, not averaged into metrics.
ROUTING_TRACE_KEYS = ("top1_expert",)

# Inputs a router may declare as keyword arguments; `MoELayer` passes those it accepts.
ROUTER_INPUTS = (
    "token_ids",
    "train",
    "renormalize",
    "seq_len",
    "chunk_size",
    "top_p",
    "mix",
    "rng",
    "attention_probs",
)


@dataclasses.dataclass(frozen=True)
class RouterContext:
    """What a MoE layer's router may read besides the hidden states.

    Attributes:
      token_ids: [batch, length] int32, for token-id routers (hash routing).
      rng: PRNG key for routers with noise (noisy top-k), or None for no noise.
      attention_probs: [batch, length, length], the preceding attention block's head-averaged
        weights (attention-aware routing).
      recurrent_state: [batch * length, recurrent_state_dim], the previous MoE layer's GRU
        state (recurrent router), or None at the first MoE layer.
      shared_router_params: parameters every MoE layer's router shares (RMoE's GRU cell).
    """

    token_ids: jax.Array | None = None
    rng: jax.Array | None = None
    attention_probs: jax.Array | None = None
    recurrent_state: jax.Array | None = None
    shared_router_params: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


class RouterState(nnx.Variable):
    """Router state updated outside the gradient (expert biases, k-means centroids); kept in the
    train state beside the parameters and checkpointed with them."""


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, param_dtype: jnp.dtype):
        self.scale = param(jnp.ones((dim,), param_dtype), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...])


def _dense_init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype, fan_in_axis: int):
    init = jax.nn.initializers.variance_scaling(
        1.0,
        "fan_in",
        "truncated_normal",
        in_axis=fan_in_axis,
        out_axis=-1,
        batch_axis=tuple(range(fan_in_axis)),
    )
    return init(key, shape, dtype)


class MLP(nnx.Module):
    """Dense SwiGLU feed-forward `[batch, length, d_model] -> [batch, length, d_model]`."""

    def __init__(self, d_model: int, d_ff: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.w_gate = param(
            _dense_init(rngs.params(), (d_model, d_ff), param_dtype, 0), ("embed", "mlp")
        )
        self.w_up = param(
            _dense_init(rngs.params(), (d_model, d_ff), param_dtype, 0), ("embed", "mlp")
        )
        self.w_down = param(
            _dense_init(rngs.params(), (d_ff, d_model), param_dtype, 0), ("mlp", "embed")
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        return swiglu(
            x.astype(dt),
            self.w_gate[...].astype(dt),
            self.w_up[...].astype(dt),
            self.w_down[...].astype(dt),
        )


@dataclasses.dataclass(frozen=True)
class MoEOptions:
    """The mixture-of-experts choices of one layer: the same-named `ModelConfig` fields, which
    document them."""

    router: str
    renormalize_top_k: bool
    dispatch: str
    capacity_factor: float
    eval_capacity_factor: float
    capacity_priority: str
    load_balance_weight: float
    router_z_weight: float
    relu_sparsity_weight: float
    chunk_sparsity_weight: float
    num_shared_experts: int
    shared_expert_d_ff: int
    gmm_impl: str
    expert_balance: str
    llep_margin: float
    llep_max_foreign: int
    top_p: float
    graph_mix: float
    recurrent_state_dim: int


class MoELayer(nnx.Module):
    """Routed SwiGLU experts stored as stacked `[experts, ...]` parameters, optionally beside
    always-on shared experts.

    The router is either a logits router from the registry (`moejax.routing`; a linear map
    `[d_model, experts]` gives its logits) or a learned router that owns its own parameters
    (`moejax.routers.learned`: cosine, ReLU+RMSNorm). Returns the layer output and a dict of
    the weighted auxiliary loss and routing statistics.
    """

    def __init__(
        self,
        d_model: int,
        expert_d_ff: int,
        num_experts: int,
        top_k: int,
        options: MoEOptions,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        self.num_experts, self.top_k, self.options, self.dtype = num_experts, top_k, options, dtype
        self.is_recurrent = options.router == "recurrent"
        self.state_dim = options.recurrent_state_dim
        learned = LEARNED_ROUTERS.get(options.router)
        if learned is None:
            self.route = routing.get_router(options.router)
            # Router logits decide discrete assignments, so the router starts near uniform.
            self.router = param(
                jax.random.normal(rngs.params(), (d_model, num_experts), param_dtype) * 0.02,
                ("embed", None),
            )
        else:
            init_fn, self.route = learned
            axes = PARAM_AXES[options.router]
            if self.is_recurrent:
                # The GRU cell is shared by all layers (as in RMoE); the model owns it.
                values = init_fn(rngs.params(), d_model, num_experts, d_state=self.state_dim)
                values = {k: v for k, v in values.items() if k not in GRU_PARAM_NAMES}
            else:
                values = init_fn(rngs.params(), d_model, num_experts)
            self.router_params = nnx.Dict(
                {
                    name: param(value.astype(param_dtype), axes[name])
                    for name, value in values.items()
                }
            )
        # Routers declare extra inputs (token ids, train mode, ...) as keyword options.
        accepted = inspect.signature(self.route).parameters
        self.router_inputs = tuple(name for name in ROUTER_INPUTS if name in accepted)
        self.state_spec = STATEFUL_ROUTERS.get(options.router)
        if self.state_spec is not None:
            initial = self.state_spec.init(rngs.params(), d_model, num_experts)
            self.router_state = RouterState(
                initial, out_sharding=self.state_spec.axes, eager_sharding=False
            )
        shape_in, shape_out = (
            (num_experts, d_model, expert_d_ff),
            (num_experts, expert_d_ff, d_model),
        )
        self.w_gate = param(
            _dense_init(rngs.params(), shape_in, param_dtype, 1), ("expert", "embed", "expert_mlp")
        )
        self.w_up = param(
            _dense_init(rngs.params(), shape_in, param_dtype, 1), ("expert", "embed", "expert_mlp")
        )
        self.w_down = param(
            _dense_init(rngs.params(), shape_out, param_dtype, 1), ("expert", "expert_mlp", "embed")
        )
        if options.num_shared_experts:
            shared_d_ff = options.shared_expert_d_ff or expert_d_ff
            shared_in = (options.num_shared_experts, d_model, shared_d_ff)
            shared_out = (options.num_shared_experts, shared_d_ff, d_model)
            self.shared_w_gate = param(
                _dense_init(rngs.params(), shared_in, param_dtype, 1), (None, "embed", "mlp")
            )
            self.shared_w_up = param(
                _dense_init(rngs.params(), shared_in, param_dtype, 1), (None, "embed", "mlp")
            )
            self.shared_w_down = param(
                _dense_init(rngs.params(), shared_out, param_dtype, 1), (None, "mlp", "embed")
            )

    def _route(self, tokens: jax.Array, context: RouterContext, *, train: bool, length: int):
        """The routing of `tokens [tokens, d_model]`, and the recurrent state it leaves."""
        available = {
            "train": train,
            "renormalize": self.options.renormalize_top_k,
            "seq_len": length,
            "chunk_size": min(8, length),
            "top_p": self.options.top_p,
            "mix": self.options.graph_mix,
            "rng": context.rng,
            "attention_probs": context.attention_probs,
        }
        if context.token_ids is not None:
            available["token_ids"] = context.token_ids.reshape(-1)  # [tokens]
        inputs = {name: available[name] for name in self.router_inputs}
        if self.state_spec is not None:
            inputs.update(self.state_spec.inputs(self.router_state[...], tokens))
        hidden = tokens.astype(jnp.float32)  # [tokens, d_model]
        if self.is_recurrent:
            params = {name: value[...] for name, value in self.router_params.items()}
            params.update(context.shared_router_params)
            return self.route(hidden, params, context.recurrent_state, top_k=self.top_k, **inputs)
        if hasattr(self, "router_params"):
            params = {name: value[...] for name, value in self.router_params.items()}
            return self.route(hidden, params, top_k=self.top_k, **inputs), None
        router_logits = hidden @ self.router[...].astype(jnp.float32)  # [tokens, experts]
        return self.route(router_logits, top_k=self.top_k, **inputs), None

    def __call__(
        self, x: jax.Array, context: RouterContext | None = None, *, train: bool = True
    ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array | None]:
        """`x [batch, length, d_model]` -> (`[batch, length, d_model]`, aux dict, new state).

        `context` carries what some routers read besides the hidden states (token ids, noise
        key, attention weights, the recurrent state); `train=False` makes batch-dependent
        routers (Sinkhorn) route causally and selects the eval capacity. The third result is
        the recurrent router's state for the next MoE layer (None for other routers).
        """
        options = self.options
        context = RouterContext() if context is None else context
        batch, length, d_model = x.shape
        tokens = x.reshape(batch * length, d_model).astype(self.dtype)  # [tokens, d_model]
        result, recurrent_state = self._route(tokens, context, train=train, length=length)
        if self.state_spec is not None and train:
            new_state = self.state_spec.update(self.router_state[...], tokens, result)
            self.router_state[...] = jax.lax.stop_gradient(new_state)
        dt = self.dtype
        experts = {
            "w_gate": constrain(self.w_gate[...].astype(dt), ("expert", "embed", "expert_mlp")),
            "w_up": constrain(self.w_up[...].astype(dt), ("expert", "embed", "expert_mlp")),
            "w_down": constrain(self.w_down[...].astype(dt), ("expert", "expert_mlp", "embed")),
        }
        shared = None
        if options.num_shared_experts:
            shared = {
                "w_gate": self.shared_w_gate[...].astype(dt),
                "w_up": self.shared_w_up[...].astype(dt),
                "w_down": self.shared_w_down[...].astype(dt),
            }
        capacity_factor = options.capacity_factor
        if not train and options.eval_capacity_factor:
            capacity_factor = options.eval_capacity_factor
        out = moe.moe_ffn(
            tokens,
            result,
            experts,
            strategy=options.dispatch,
            capacity_factor=capacity_factor,
            gmm_impl=options.gmm_impl,
            expert_balance=options.expert_balance,
            llep_margin=options.llep_margin,
            llep_max_foreign=options.llep_max_foreign,
            priority=options.capacity_priority,
            shared_params=shared,
        )
        losses = result.aux_losses
        zero = jnp.float32(0.0)
        aux = {
            "aux_loss": options.load_balance_weight * losses["load_balance"]
            + options.router_z_weight * losses["router_z"]
            + options.relu_sparsity_weight * losses.get("relu_sparsity", zero)
            + options.chunk_sparsity_weight * losses.get("chunk_sparsity_loss", zero),
            "load_balance_loss": losses["load_balance"],
            "router_z_loss": losses["router_z"],
            "dropped_fraction": jnp.asarray(out.dropped_fraction, jnp.float32),
            # Per-token, for routing fluctuation and inter-layer affinity at evaluation.
            "top1_expert": result.expert_index[:, 0],
            # Chunk sparsity over 8 consecutive tokens, as BlockFFN reports it.
            **metrics.layer_metrics(
                result, self.num_experts, seq_len=length, chunk_size=min(8, length)
            ),
        }
        return out.y.reshape(batch, length, d_model), aux, recurrent_state
