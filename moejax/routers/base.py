"""The router contract: the `Routing` a router returns, its `RouterSpec`, and the registry.

A router is a pure function plus a `RouterSpec` that says what the MoE layer must hand it. The
layer reads the spec, never the router's name: `needs` lists the inputs the route function
takes as keyword arguments, `init_params` the parameters the layer owns for it, `state` what it
keeps between steps outside the gradient, `options` its own settings (a typed `RouterOptions`,
`model.router.options` in a config) and `loss_weights` which weight scales each of its auxiliary
losses. `moejax.routers` registers every built-in router by importing its file; adding a router
is one file that calls `register(RouterSpec(...))` and one import line there.

Routing math runs in float32 whatever the activation dtype: bf16 softmax and top-k ties make
expert choice noisy and the auxiliary losses biased (as flaxformer's routers also do).
"""

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.scipy.special import entr

from moejax.errors import require

Params = dict[str, jax.Array]
Axes = tuple[str | None, ...]

# Router weights start near uniform (std 0.02, as `MoELayer.router` and the BlockFFN and RMoE
# reference code do): their logits decide discrete assignments.
ROUTER_INIT_STD = 0.02


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """What a router decided for each token.

    Attributes:
      expert_index: [tokens, top_k] int32, the chosen experts, best first.
      combine_weights: [tokens, top_k] float32, the weight of each chosen expert's output.
      router_probs: [tokens, num_experts] float32, the full softmax over experts.
      aux_losses: name -> scalar float32, unweighted; the router's spec says which config
        weight scales each one (`RouterSpec.loss_weights`).
    """

    expert_index: jax.Array
    combine_weights: jax.Array
    router_probs: jax.Array
    aux_losses: dict[str, jax.Array]


class RouterState(nnx.Variable):
    """Router state updated outside the gradient (expert biases, k-means centroids); kept in the
    train state beside the parameters and checkpointed with them."""


# What the MoE layer can hand a router, by the keyword the route function takes it under.
CONTEXT_NEEDS: Mapping[str, str] = {
    "router_logits": "[tokens, num_experts] float32, the layer's linear map of the hidden states",
    "hidden": "[tokens, d_model] float32, the hidden states",
    "params": "the router's own parameters (from `init_params`, plus `init_shared_params`)",
    "state_prev": "[tokens, d_state] the previous MoE layer's recurrent routing state, or None",
    "token_ids": "[tokens] int32 token ids",
    "rng": "a PRNG key for routing noise, or None for no noise",
    "train": "bool, training (True) or causal evaluation routing (False)",
    "attention_probs": "[batch, length, length] the preceding attention's head-averaged weights",
    "seq_len": "int, the sequence length (tokens are [batch * seq_len])",
    "chunk_size": "int, consecutive tokens per sparsity chunk (min(8, seq_len))",
}

# The loss weights every router config has (`RouterConfig` fields), by the loss they weigh; a
# router's own loss weights are fields of its options.
COMMON_LOSS_WEIGHTS: Mapping[str, str] = {
    "load_balance": "load_balance_weight",
    "router_z": "router_z_weight",
}


@dataclasses.dataclass(frozen=True)
class RouterOptions:
    """A router's own settings, `model.router.options` in a config: a frozen dataclass per
    router with defaults, checked when built.

    Every field is passed to the route function as the keyword of the same name, except those
    in `layer_fields`, which the layer reads instead (a parameter width for `init_params`, the
    weight of one of the router's losses).
    """

    layer_fields: ClassVar[tuple[str, ...]] = ()

    def route_arguments(self) -> dict[str, object]:
        """The fields the route function takes, by keyword."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in self.layer_fields
        }


@dataclasses.dataclass(frozen=True)
class TopKOptions(RouterOptions):
    """Options of a router that picks top-k experts by weight.

    Attributes:
      renormalize: rescale each token's chosen weights to sum to 1 (False keeps the raw
        router probabilities, as Switch does for top-1).
    """

    renormalize: bool = True


@dataclasses.dataclass(frozen=True)
class RouterStateSpec:
    """State a router keeps between steps, updated after each training step without gradient.

    Attributes:
      argument: the route function's keyword for the state (e.g. "expert_bias").
      init: `(key, d_model, num_experts) -> array`, the initial value.
      axes: logical axis names of the state array.
      update: `(state, hidden [tokens, d_model], routing) -> array`, the value after a step.
    """

    argument: str
    init: Callable[[jax.Array, int, int], jax.Array]
    axes: Axes
    update: Callable[[jax.Array, jax.Array, Routing], jax.Array]


# Compared and hashed by identity: one registered instance per name (a model\'s static
# structure holds it, and jit hashes that structure).
@dataclasses.dataclass(frozen=True, eq=False)
class RouterSpec:
    """Everything the MoE layer needs to know about one router.

    Attributes:
      name: the value of `model.router.name` that selects it.
      route: `route(*, top_k, **needs, **options.route_arguments()) -> Routing` (or
        `(Routing, state)` when "state_prev" is needed: the state handed to the next MoE layer).
      needs: the context keywords `route` takes besides `top_k` and its options, each a key of
        `CONTEXT_NEEDS`.
      options: the router's `RouterOptions` class, whose defaults are the router's defaults
        (`TopKOptions` for routers with `renormalize`; the empty `RouterOptions` by default).
      init_params: `(key, d_model, num_experts, options) -> Params`, parameters each layer owns
        for the router (passed as "params"), `options` an instance of `options`; None for
        logits routers.
      param_axes: logical axis names of each parameter of `init_params` and
        `init_shared_params`.
      init_shared_params: `(key, options) -> Params`, parameters one model shares across its
        MoE layers (RMoE's GRU cell), merged into "params"; None if none.
      state: state kept between steps (`RouterStateSpec`), or None.
      loss_weights: aux loss name -> the field that weighs it in the training loss: a
        `COMMON_LOSS_WEIGHTS` field of the router config, or a layer field of `options`.
    """

    name: str
    route: Callable[..., Routing | tuple[Routing, jax.Array]]
    needs: tuple[str, ...] = ("router_logits",)
    options: type[RouterOptions] = RouterOptions
    init_params: Callable[..., Params] | None = None
    param_axes: Mapping[str, Axes] = dataclasses.field(default_factory=dict)
    init_shared_params: Callable[..., Params] | None = None
    state: RouterStateSpec | None = None
    loss_weights: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: dict(COMMON_LOSS_WEIGHTS)
    )

    def __post_init__(self) -> None:
        unknown = [need for need in self.needs if need not in CONTEXT_NEEDS]
        require(
            not unknown,
            f"RouterSpec({self.name!r}).needs",
            unknown,
            f"names from {', '.join(CONTEXT_NEEDS)}",
        )
        require(
            ("params" in self.needs) == (self.init_params is not None),
            f"RouterSpec({self.name!r}).init_params",
            self.init_params,
            "a function exactly when 'params' is among the needs",
        )
        require(
            isinstance(self.options, type) and issubclass(self.options, RouterOptions),
            f"RouterSpec({self.name!r}).options",
            self.options,
            "a RouterOptions subclass",
        )
        keywords = inspect.signature(self.route).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in keywords.values())
        route_fields = [
            f.name
            for f in dataclasses.fields(self.options)
            if f.name not in self.options.layer_fields
        ]
        missing = [name for name in route_fields if name not in keywords and not takes_any]
        require(
            not missing,
            f"RouterSpec({self.name!r}).options",
            missing,
            "option fields the route function takes as keywords (or listed in layer_fields)",
        )
        weights = set(COMMON_LOSS_WEIGHTS.values()) | set(self.options.layer_fields)
        unknown = sorted(set(self.loss_weights.values()) - weights)
        require(
            not unknown,
            f"RouterSpec({self.name!r}).loss_weights",
            unknown,
            f"fields from {', '.join(sorted(weights))} (common weights and the options' layer "
            "fields)",
        )

    def loss_weight(self, field: str, options: RouterOptions, common: object) -> float:
        """The value of loss-weight `field`: from `options` when it is one of its layer fields,
        else from `common` (the router config holding `COMMON_LOSS_WEIGHTS`)."""
        source = options if field in self.options.layer_fields else common
        return getattr(source, field)


ROUTERS: dict[str, RouterSpec] = {}


def register(spec: RouterSpec) -> RouterSpec:
    """Makes `spec.name` selectable as `model.router.name`; returns the spec."""
    require(spec.name not in ROUTERS, "router", spec.name, "a name not already registered")
    ROUTERS[spec.name] = spec
    return spec


def get(name: str) -> RouterSpec:
    """The spec registered under `name`; a ValueError listing the allowed names otherwise."""
    # Registration order keeps the built-in softmax_top_k first.
    require(name in ROUTERS, "router", name, ", ".join(ROUTERS))
    return ROUTERS[name]


# --- argument checks shared by the routers ------------------------------------------------


def check_router_inputs(router_logits: jax.Array, top_k: int) -> int:
    """Validates the arguments every logits router shares and returns num_experts.

    Args:
      router_logits: [tokens, num_experts].
      top_k: experts per token (the maximum, for routers with a variable number), in
        [1, num_experts].
    """
    if router_logits.ndim != 2:
        raise ValueError(
            f"router_logits: expected [tokens, num_experts], got shape {router_logits.shape}"
        )
    num_experts = router_logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: got {top_k}; allowed: 1 <= top_k <= num_experts={num_experts}")
    return num_experts


def check_hidden(hidden: jax.Array, weight: jax.Array, weight_name: str) -> None:
    """Validates hidden [tokens, d_model] against a parameter whose first dimension is d_model."""
    require(hidden.ndim == 2, "hidden", f"shape {hidden.shape}", "[tokens, d_model]")
    require(
        hidden.shape[1] == weight.shape[0],
        "hidden",
        f"shape {hidden.shape}",
        f"[tokens, d_model={weight.shape[0]}] to match params[{weight_name!r}] {weight.shape}",
    )


def check_int(value: object, field: str, minimum: int = 1) -> None:
    require(isinstance(value, int) and value >= minimum, field, value, f"an int >= {minimum}")


def check_top_k(top_k: int, num_experts: int) -> None:
    require(
        isinstance(top_k, int) and 1 <= top_k <= num_experts,
        "top_k",
        top_k,
        f"an int with 1 <= top_k <= num_experts={num_experts}",
    )


def check_token_ids(token_ids: jax.Array | None, num_tokens: int, router: str) -> jax.Array:
    """Validates the token ids a token-id router needs and returns them as int32 [tokens]."""
    if token_ids is None:
        raise ValueError(
            f"token_ids: got None; allowed: an int array [tokens={num_tokens}] "
            f"(the {router!r} router routes by token id)"
        )
    token_ids = jnp.asarray(token_ids)
    require(
        token_ids.shape == (num_tokens,) and jnp.issubdtype(token_ids.dtype, jnp.integer),
        "token_ids",
        f"{token_ids.dtype}{list(token_ids.shape)}",
        f"an int array of shape [tokens={num_tokens}]",
    )
    return token_ids.astype(jnp.int32)


# --- diagnostics --------------------------------------------------------------------------


def expert_load(expert_index: jax.Array, num_experts: int) -> jax.Array:
    """Fraction of all assignments that go to each expert: [tokens, top_k] -> [num_experts]."""
    counts = jnp.bincount(expert_index.reshape(-1), length=num_experts)  # [experts]
    return counts.astype(jnp.float32) / expert_index.size


def routing_statistics(routing: Routing, num_experts: int) -> dict[str, jax.Array]:
    """Diagnostics of a routing decision, for logging (no gradients intended).

    Args:
      routing: a `Routing` for some tokens.
      num_experts: the number of experts routed over.

    Returns:
      "expert_load": [num_experts], fraction of the tokens * top_k assignments per expert (sums
        to 1); "load_max_over_mean": scalar, 1.0 at perfect balance, num_experts when collapsed;
      "routing_entropy": scalar, mean over tokens of the entropy of router_probs, in nats.
    """
    if routing.router_probs.shape[-1] != num_experts:
        raise ValueError(
            f"num_experts: got {num_experts} but router_probs has shape "
            f"{routing.router_probs.shape}"
        )
    load = expert_load(routing.expert_index, num_experts)  # [experts]
    # entr(p) = -p log p with entr(0) = 0, so experts with zero probability add nothing.
    entropy = jnp.sum(entr(routing.router_probs.astype(jnp.float32)), axis=-1)  # [tokens]
    return {
        "expert_load": load,
        "load_max_over_mean": jnp.max(load) / jnp.mean(load),
        "routing_entropy": jnp.mean(entropy),
    }
