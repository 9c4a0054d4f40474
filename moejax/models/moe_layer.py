"""The mixture-of-experts layer: a router chosen by name, then routed SwiGLU experts.

The layer calls its router through the router's `RouterSpec` (`moejax.routers.base`): it hands
over exactly the inputs the spec declares in `needs` and the router's own options, owns the
parameters and state the spec describes, and weighs the router's auxiliary losses by the config
fields the spec names. It knows no router by name. The expert math is the pure functions of
`moejax.moe`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import metrics, moe
from moejax.config import MoEConfig, RouterConfig
from moejax.models.layers import dense_init
from moejax.routers.base import ROUTER_INIT_STD, RouterState
from moejax.sharding import constrain, param

# Per-token entries of a MoE layer's aux dict: read by evaluation, not averaged into metrics.
ROUTING_TRACE_KEYS = ("top1_expert",)


@dataclasses.dataclass(frozen=True)
class RouterContext:
    """What a MoE layer's router may read besides the hidden states.

    Attributes:
      token_ids: [batch, length] int32, for token-id routers (hash routing).
      rng: PRNG key for routers with noise (noisy top-k), or None for no noise.
      attention_probs: [batch, length, length], the preceding attention block's head-averaged
        weights (attention-aware routing).
      recurrent_state: [batch * length, state_dim], the previous MoE layer's GRU
        state (recurrent router), or None at the first MoE layer.
      shared_router_params: parameters every MoE layer's router shares (RMoE's GRU cell).
    """

    token_ids: jax.Array | None = None
    rng: jax.Array | None = None
    attention_probs: jax.Array | None = None
    recurrent_state: jax.Array | None = None
    shared_router_params: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


class MoELayer(nnx.Module):
    """Routed SwiGLU experts stored as stacked `[experts, ...]` parameters, optionally beside
    always-on shared experts.

    `moe` gives the experts (`num_experts`, `top_k`, `expert_d_ff`, shared experts) and the
    dispatch; `router` the router (a name takes its default options). When the router's spec
    needs "router_logits" the layer owns a linear map `[d_model, experts]` that gives them; when
    it has `init_params` the layer owns those parameters; when it has `state` the layer keeps it
    as a `RouterState`. Returns the layer output and a dict of the weighted auxiliary loss and
    routing statistics.
    """

    def __init__(
        self,
        d_model: int,
        moe: MoEConfig,
        router: RouterConfig | str = "softmax_top_k",
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        router = RouterConfig(name=router) if isinstance(router, str) else router
        num_experts, expert_d_ff = moe.num_experts, moe.expert_d_ff
        self.num_experts, self.top_k, self.dtype = num_experts, moe.top_k, dtype
        self.moe, self.router_config, self.spec = moe, router, router.spec
        if "router_logits" in self.spec.needs:
            # Router logits decide discrete assignments, so the router starts near uniform.
            self.router = param(
                jax.random.normal(rngs.params(), (d_model, num_experts), param_dtype)
                * ROUTER_INIT_STD,
                ("embed", None),
            )
        if self.spec.init_params is not None:
            values = self.spec.init_params(rngs.params(), d_model, num_experts, router.options)
            self.router_params = nnx.Dict(
                {
                    name: param(value.astype(param_dtype), self.spec.param_axes[name])
                    for name, value in values.items()
                }
            )
        if self.spec.state is not None:
            initial = self.spec.state.init(rngs.params(), d_model, num_experts)
            self.router_state = RouterState(
                initial, out_sharding=self.spec.state.axes, eager_sharding=False
            )
        shape_in, shape_out = (
            (num_experts, d_model, expert_d_ff),
            (num_experts, expert_d_ff, d_model),
        )
        self.w_gate = param(
            dense_init(rngs.params(), shape_in, param_dtype, 1), ("expert", "embed", "expert_mlp")
        )
        self.w_up = param(
            dense_init(rngs.params(), shape_in, param_dtype, 1), ("expert", "embed", "expert_mlp")
        )
        self.w_down = param(
            dense_init(rngs.params(), shape_out, param_dtype, 1), ("expert", "expert_mlp", "embed")
        )
        if moe.num_shared_experts:
            shared_d_ff = moe.shared_expert_d_ff or expert_d_ff
            shared_in = (moe.num_shared_experts, d_model, shared_d_ff)
            shared_out = (moe.num_shared_experts, shared_d_ff, d_model)
            self.shared_w_gate = param(
                dense_init(rngs.params(), shared_in, param_dtype, 1), (None, "embed", "mlp")
            )
            self.shared_w_up = param(
                dense_init(rngs.params(), shared_in, param_dtype, 1), (None, "embed", "mlp")
            )
            self.shared_w_down = param(
                dense_init(rngs.params(), shared_out, param_dtype, 1), (None, "mlp", "embed")
            )

    def _route(self, tokens: jax.Array, context: RouterContext, *, train: bool, length: int):
        """The routing of `tokens [tokens, d_model]`, and the recurrent state it leaves."""
        spec = self.spec
        hidden = tokens.astype(jnp.float32)  # [tokens, d_model]
        inputs = {}
        for need in spec.needs:
            if need == "router_logits":
                inputs[need] = hidden @ self.router[...].astype(jnp.float32)  # [tokens, experts]
            elif need == "hidden":
                inputs[need] = hidden
            elif need == "params":
                params = {name: value[...] for name, value in self.router_params.items()}
                inputs[need] = {**params, **context.shared_router_params}
            elif need == "state_prev":
                inputs[need] = context.recurrent_state
            elif need == "token_ids":
                inputs[need] = _flat_token_ids(context.token_ids)  # [tokens]
            elif need == "rng":
                inputs[need] = context.rng
            elif need == "attention_probs":
                inputs[need] = context.attention_probs
            elif need == "train":
                inputs[need] = train
            elif need == "seq_len":
                inputs[need] = length
            elif need == "chunk_size":
                inputs[need] = min(8, length)
            else:
                raise ValueError(f"router {spec.name!r}: needs {need!r}, which MoELayer lacks")
        if spec.state is not None:
            inputs[spec.state.argument] = self.router_state[...]
        result = spec.route(
            top_k=self.top_k, **inputs, **self.router_config.options.route_arguments()
        )
        if "state_prev" in spec.needs:
            return result
        return result, None

    def __call__(
        self, x: jax.Array, context: RouterContext | None = None, *, train: bool = True
    ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array | None]:
        """`x [batch, length, d_model]` -> (`[batch, length, d_model]`, aux dict, new state).

        `context` carries what some routers read besides the hidden states (token ids, noise
        key, attention weights, the recurrent state); `train=False` makes batch-dependent
        routers (Sinkhorn) route causally and selects the eval capacity. The third result is
        the recurrent router's state for the next MoE layer (None for other routers).
        """
        moe_config = self.moe
        context = RouterContext() if context is None else context
        batch, length, d_model = x.shape
        tokens = x.reshape(batch * length, d_model).astype(self.dtype)  # [tokens, d_model]
        result, recurrent_state = self._route(tokens, context, train=train, length=length)
        if self.spec.state is not None and train:
            new_state = self.spec.state.update(self.router_state[...], tokens, result)
            self.router_state[...] = jax.lax.stop_gradient(new_state)
        dt = self.dtype
        experts = {
            "w_gate": constrain(self.w_gate[...].astype(dt), ("expert", "embed", "expert_mlp")),
            "w_up": constrain(self.w_up[...].astype(dt), ("expert", "embed", "expert_mlp")),
            "w_down": constrain(self.w_down[...].astype(dt), ("expert", "expert_mlp", "embed")),
        }
        shared = None
        if moe_config.num_shared_experts:
            shared = {
                "w_gate": self.shared_w_gate[...].astype(dt),
                "w_up": self.shared_w_up[...].astype(dt),
                "w_down": self.shared_w_down[...].astype(dt),
            }
        capacity_factor = moe_config.capacity_factor
        if not train and moe_config.eval_capacity_factor:
            capacity_factor = moe_config.eval_capacity_factor
        out = moe.moe_ffn(
            tokens,
            result,
            experts,
            strategy=moe_config.dispatch,
            capacity_factor=capacity_factor,
            gmm_impl=moe_config.gmm_impl,
            expert_balance=moe_config.expert_balance,
            llep_margin=moe_config.llep_margin,
            llep_max_foreign=moe_config.llep_max_foreign,
            priority=moe_config.capacity_priority,
            shared_params=shared,
        )
        # Every loss the router's spec declares, weighed by the field the spec names for it, and
        # reported unweighted as "<name>_loss".
        losses = result.aux_losses
        aux = {
            "aux_loss": sum(
                self.router_config.loss_weight(weight) * losses[name]
                for name, weight in self.spec.loss_weights.items()
            ),
            **{
                f"{name.removesuffix('_loss')}_loss": losses[name]
                for name in self.spec.loss_weights
            },
            "dropped_fraction": jnp.asarray(out.dropped_fraction, jnp.float32),
            # Per-token, for routing fluctuation and inter-layer affinity at evaluation.
            "top1_expert": result.expert_index[:, 0],
            # Chunk sparsity over 8 consecutive tokens, as BlockFFN reports it.
            **metrics.layer_metrics(
                result, self.num_experts, seq_len=length, chunk_size=min(8, length)
            ),
        }
        return out.y.reshape(batch, length, d_model), aux, recurrent_state


def _flat_token_ids(token_ids: jax.Array | None) -> jax.Array | None:
    """`[batch, length]` -> `[tokens]`; None stays None (the router then names what is missing)."""
    return None if token_ids is None else token_ids.reshape(-1)
