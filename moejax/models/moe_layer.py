"""The mixture-of-experts layer: a router chosen by name, then routed SwiGLU experts.

The layer calls its router through the router's `RouterSpec` (`moejax.routers.base`): it hands
over exactly the inputs the spec declares in `needs` and the router's own options, owns the
parameters and state the spec describes, and weighs the router's auxiliary losses by the config
fields the spec names. It knows no router by name: what it can hand a router is a table of
providers, one per context need (`CONTEXT_PROVIDERS`). The expert math is the dispatch strategy
named by `moe.dispatch` (`moejax.moe`), called with its typed options and the mesh the step is
traced under; the layer knows no strategy by name either.

Outside code (pruning, analysis) reads a layer through `route` (the routing of some hidden
states, without updating router state) and `expert_params` / `shared_expert_params` (the
weights the experts run with).

A layer may carry a `RouterLogitOffset` (`[experts]` float32, attached by
`moejax.training.rewiring`), which the "router_logits" provider adds to every token's logits:
the test-time routing adjustment of *Rewiring Experts on the Fly*. It is an `nnx.Variable` and
not an `nnx.Param` because it is not part of the model: the training loop's optimizer and the
checkpoints select `nnx.Param` (and `RouterState`), so an offset is never trained with the
weights, never saved with them, and a model without one has exactly the parameters and
checkpoint it had before; fitting it selects this type alone, which leaves everything else
frozen by construction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import metrics, moe
from moejax.attention import check_hidden
from moejax.config import MoEConfig, RouterConfig
from moejax.errors import require
from moejax.models.layers import dense_init
from moejax.moe import ExpertParams
from moejax.parallel.sharding import constrain, kernel_mesh, param
from moejax.routers.base import ROUTER_INIT_STD, RouterState, Routing

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


@dataclasses.dataclass(frozen=True)
class _RouteInputs:
    """What the providers of `CONTEXT_PROVIDERS` read: the layer, the hidden states
    `[tokens, d_model]` in float32, the context, the mode and the sequence length."""

    layer: MoELayer
    hidden: jax.Array
    context: RouterContext
    train: bool
    length: int


def _router_params(inputs: _RouteInputs) -> dict[str, jax.Array]:
    params = {name: value[...] for name, value in inputs.layer.router_params.items()}
    return {**params, **inputs.context.shared_router_params}


class RouterLogitOffset(nnx.Variable):
    """`[experts]` float32 added to a layer's router logits at test time (module docstring)."""


def _router_logits(inputs: _RouteInputs) -> jax.Array:
    logits = inputs.hidden @ inputs.layer.router[...].astype(jnp.float32)  # [tokens, experts]
    offset = getattr(inputs.layer, "logit_offset", None)
    return logits if offset is None else logits + offset[...]


# How the layer provides each router context need (`moejax.routers.base.CONTEXT_NEEDS`).
CONTEXT_PROVIDERS: Mapping[str, Callable[[_RouteInputs], object]] = {
    "router_logits": _router_logits,
    "hidden": lambda i: i.hidden,
    "params": _router_params,
    "state_prev": lambda i: i.context.recurrent_state,
    "token_ids": lambda i: _flat_token_ids(i.context.token_ids),  # [tokens]
    "rng": lambda i: i.context.rng,
    "attention_probs": lambda i: i.context.attention_probs,
    "train": lambda i: i.train,
    "seq_len": lambda i: i.length,
    "chunk_size": lambda i: min(8, i.length),
}


class MoELayer(nnx.Module):
    """Routed SwiGLU experts stored as stacked `[experts, ...]` parameters, optionally beside
    always-on shared experts.

    `MoELayer(d_model, d_ff, num_experts, top_k, rngs=nnx.Rngs(0))` is a layer of `num_experts`
    SwiGLU experts of width `d_ff`, each token sent to `top_k` of them by the softmax top-k
    router. `router` picks another router: a name (its default options) or a `RouterConfig`
    (`RouterConfig.of("top_p", top_p=0.5)`, loss weights). `moe` gives the rest of the MoE
    choices (dispatch, capacity, shared experts); its `num_experts`, `top_k` and `expert_d_ff`
    are taken from the arguments. `MoELayer.from_config` builds one from a `MoEConfig` alone.

    When the router's spec needs "router_logits" the layer owns a linear map `[d_model,
    experts]` that gives them; when it has `init_params` the layer owns those parameters; when
    it has `state` the layer keeps it as a `RouterState`, updated by every training call
    outside the gradient. Returns the layer output and a dict of the weighted auxiliary loss
    (`aux["aux_loss"]`, to add to the training loss) and routing statistics.

    A stateful router (`bias_balanced`, `kmeans`) under the user's own `jax.grad`: the call
    writes the new state into the module, which a transform may not do to a module from
    outside it (`TraceContextError`). Split the state out, merge a copy inside the function
    (`copy=True`: the Variables then belong to the function's trace) and return the new state
    from the loss as its auxiliary output::

        graphdef, params, router_state = nnx.split(model, nnx.Param, RouterState)

        def loss_fn(params, router_state, x, y):
            model = nnx.merge(graphdef, params, router_state, copy=True)
            out, aux, _ = model(x)
            loss = jnp.mean((out - y) ** 2) + aux["aux_loss"]
            return loss, nnx.state(model, RouterState)

        (loss, router_state), grads = jax.grad(loss_fn, has_aux=True)(params, router_state, x, y)

    (`nnx.grad` and `nnx.jit` on the model itself carry the state without this.)
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        num_experts: int,
        top_k: int,
        *,
        router: RouterConfig | str = "softmax_top_k",
        moe: MoEConfig | None = None,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        for field, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
            require(isinstance(value, int) and value > 0, f"MoELayer {field}", value, "an int > 0")
        require(
            isinstance(top_k, int) and 1 <= top_k <= num_experts,
            "MoELayer top_k",
            top_k,
            f"an int in [1, num_experts={num_experts}]",
        )
        moe = _with_experts(moe, expert_d_ff=d_ff, num_experts=num_experts, top_k=top_k)
        router = RouterConfig(name=router) if isinstance(router, str) else router
        expert_d_ff = d_ff
        self.d_model, self.num_experts, self.top_k, self.dtype = d_model, num_experts, top_k, dtype
        self.moe, self.router_config, self.spec = moe, router, router.spec
        self.dispatch = moe.dispatch
        lacking = [need for need in self.spec.needs if need not in CONTEXT_PROVIDERS]
        require(
            not lacking,
            f"MoELayer router {self.spec.name!r} needs",
            lacking,
            f"context MoELayer provides: {', '.join(CONTEXT_PROVIDERS)}",
        )
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
            if moe.shared_expert_gate:
                # Starts at sigmoid(0) = 1/2 for every token.
                self.shared_gate = param(jnp.zeros((d_model,), param_dtype), ("embed",))

    @classmethod
    def from_config(
        cls,
        d_model: int,
        moe: MoEConfig,
        router: RouterConfig | str = "softmax_top_k",
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ) -> MoELayer:
        """The layer of `moe`'s experts (`num_experts`, `top_k`, `expert_d_ff`) and choices."""
        return cls(
            d_model,
            moe.expert_d_ff,
            moe.num_experts,
            moe.top_k,
            router=router,
            moe=moe,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def _check_context(self, context: RouterContext, batch: int, length: int) -> None:
        """ValueError naming the router and the missing or misshapen context input."""
        expected = {"token_ids": (batch, length), "attention_probs": (batch, length, length)}
        for need, shape in expected.items():
            if need not in self.spec.needs:
                continue
            value = getattr(context, need)
            require(
                value is not None and tuple(value.shape) == shape,
                f"MoELayer router {self.spec.name!r}: context.{need}",
                None if value is None else f"shape {tuple(value.shape)}",
                f"shape {list(shape)}, passed as layer(x, RouterContext({need}=...))",
            )

    def _route(self, tokens: jax.Array, context: RouterContext, *, train: bool, length: int):
        """The routing of `tokens [tokens, d_model]`, and the recurrent state it leaves."""
        spec = self.spec
        route_inputs = _RouteInputs(self, tokens.astype(jnp.float32), context, train, length)
        inputs = {need: CONTEXT_PROVIDERS[need](route_inputs) for need in spec.needs}
        if spec.state is not None:
            inputs[spec.state.argument] = self.router_state[...]
        result = spec.route(
            top_k=self.top_k, **inputs, **self.router_config.options.route_arguments()
        )
        if "state_prev" in spec.needs:
            return result
        return result, None

    def _tokens(self, x: jax.Array, context: RouterContext) -> jax.Array:
        """Checks `x [batch, length, d_model]` and the context; the tokens `[tokens, d_model]`
        in the layer's dtype."""
        check_hidden("MoELayer", x, self.d_model)
        batch, length, d_model = x.shape
        self._check_context(context, batch, length)
        return x.reshape(batch * length, d_model).astype(self.dtype)

    def route(
        self, x: jax.Array, context: RouterContext | None = None, *, train: bool = True
    ) -> Routing:
        """The routing `__call__` uses for `x [batch, length, d_model]`: a `Routing` of its
        `batch * length` tokens (`expert_index [tokens, top_k]`, ...). Runs no expert and
        updates no router state: the public way for drivers above the layer (DSnoT's
        calibration inputs per expert, routing analyses) to learn which tokens reach which
        expert."""
        context = RouterContext() if context is None else context
        tokens = self._tokens(x, context)
        return self._route(tokens, context, train=train, length=x.shape[1])[0]

    def expert_params(self) -> ExpertParams:
        """The routed experts' weights in the layer's dtype: {"w_gate", "w_up": [experts,
        d_model, d_ff], "w_down": [experts, d_ff, d_model]}."""
        dt = self.dtype
        return {
            "w_gate": constrain(self.w_gate[...].astype(dt), ("expert", "embed", "expert_mlp")),
            "w_up": constrain(self.w_up[...].astype(dt), ("expert", "embed", "expert_mlp")),
            "w_down": constrain(self.w_down[...].astype(dt), ("expert", "expert_mlp", "embed")),
        }

    def shared_expert_params(self) -> ExpertParams | None:
        """The shared experts' weights in the layer's dtype ([num_shared, ...]), or None."""
        if not self.moe.num_shared_experts:
            return None
        return {
            name: getattr(self, f"shared_{name}")[...].astype(self.dtype)
            for name in ("w_gate", "w_up", "w_down")
        }

    def _shared_gate(self, tokens: jax.Array) -> jax.Array | None:
        """`[tokens]` sigmoid gates of the shared experts' output, or None without a gate."""
        if not hasattr(self, "shared_gate"):
            return None
        logits = jnp.einsum(
            "td,d->t",
            tokens,
            self.shared_gate[...].astype(tokens.dtype),
            preferred_element_type=jnp.float32,
        )
        return jax.nn.sigmoid(logits)

    def __call__(
        self, x: jax.Array, context: RouterContext | None = None, *, train: bool = True
    ) -> tuple[jax.Array, dict[str, jax.Array], jax.Array | None]:
        """`x [batch, length, d_model]` -> (`[batch, length, d_model]`, aux dict, new state).

        `context` carries what some routers read besides the hidden states (token ids, noise
        key, attention weights, the recurrent state); `train=False` makes batch-dependent
        routers (Sinkhorn) route causally and selects the eval capacity. The third result is
        the recurrent router's state for the next MoE layer (None for other routers).
        """
        context = RouterContext() if context is None else context
        tokens = self._tokens(x, context)  # [tokens, d_model]
        batch, length, d_model = x.shape
        result, recurrent_state = self._route(tokens, context, train=train, length=length)
        if self.spec.state is not None and train:
            new_state = self.spec.state.update(self.router_state[...], tokens, result)
            self.router_state[...] = jax.lax.stop_gradient(new_state)
        out = moe.moe_ffn(
            tokens,
            result,
            self.expert_params(),
            strategy=self.dispatch.name,
            options=self.dispatch.options,
            # The step's mesh, checked by the strategy against its expert axis.
            mesh=kernel_mesh(),
            train=train,
            shared_params=self.shared_expert_params(),
            shared_gate=self._shared_gate(tokens),
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


def _with_experts(moe: MoEConfig | None, **experts: int) -> MoEConfig:
    """`moe` (default `MoEConfig()`) with the layer's expert arguments. A field of `moe` that
    is neither its default nor the argument's value is a conflict: a ValueError naming both."""
    if moe is None:
        return MoEConfig(**experts)
    defaults = MoEConfig()
    for field, value in experts.items():
        given = getattr(moe, field)
        argument = "d_ff" if field == "expert_d_ff" else field
        require(
            given in (value, getattr(defaults, field)),
            f"MoELayer moe.{field}",
            given,
            f"{argument}={value} (the layer's argument) or the default, which the argument sets",
        )
    return dataclasses.replace(moe, **experts)


def _flat_token_ids(token_ids: jax.Array | None) -> jax.Array | None:
    """`[batch, length]` -> `[tokens]`; None stays None (the router then names what is missing)."""
    return None if token_ids is None else token_ids.reshape(-1)
