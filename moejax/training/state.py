"""The train state (one pytree), the optimizer, and the shardings of both.

Parameters are kept as a pure dict of arrays (`nnx.to_pure_dict`) so that checkpoints are
plain nested dicts, independent of Flax's Variable classes; `nnx.merge(graphdef, params)`
turns them back into a module inside the step.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax.config import Config, ConfigError, ModelConfig, TrainConfig
from moejax.models.transformer import TransformerLM
from moejax.parallel import sharding
from moejax.pruning.config import PruningConfig, wrap_optimizer
from moejax.routers.base import RouterState
from moejax.sparse_attention.config import AttentionConfig
from moejax.training.pruning import LMPruning, deployed_params

log = logging.getLogger(__name__)

# {"step": int32 [], "params": pure dict, "opt_state": optax state} and, for routers with
# state (expert biases, centroids), "router_state": pure dict. Models without router state
# leave the key out, so their checkpoints do not depend on the feature. A pruned run's
# opt_state is a `PruneState` holding the masks (like params, sharded like them).
TrainState = dict[str, Any]


def model_variables(state: TrainState) -> dict[str, Any]:
    """The parts of the train state the model is built from (what eval and sampling need).

    A pruned run's params come with the optimizer-state masks applied: a no-op for masked
    pruning (pruned weights are zero already), the n:m projection for SR-STE.
    """
    params = deployed_params(state["params"], state["opt_state"])
    return {"params": params, "router_state": state.get("router_state", {})}


def learning_rate_schedule(train: TrainConfig) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, cosine decay to `learning_rate * min_lr_ratio`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train.learning_rate,
        warmup_steps=train.warmup_steps,
        decay_steps=max(train.steps, train.warmup_steps + 1),
        end_value=train.learning_rate * train.min_lr_ratio,
    )


def make_optimizer(
    train: TrainConfig, pruning: PruningConfig | None = None
) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; no weight decay on vectors (norm scales). With a
    `pruning` config that prunes, wrapped by `prune_optax` (masks in the optimizer state)."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    inner = optax.chain(
        optax.clip_by_global_norm(train.grad_clip_norm),
        optax.adamw(
            learning_rate_schedule(train),
            b1=train.beta1,
            b2=train.beta2,
            weight_decay=train.weight_decay,
            mask=decay_mask,
        ),
    )
    return inner if pruning is None else wrap_optimizer(inner, pruning)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the step functions need to rebuild the model: graph, logical axes, shapes."""

    graphdef: nnx.GraphDef
    logical_axes: dict[str, Any]
    abstract_params: dict[str, Any]
    router_state_axes: dict[str, Any]
    abstract_router_state: dict[str, Any]

    def merge(self, variables: dict[str, Any]) -> TransformerLM:
        """The model with `variables` = {"params", "router_state"} (pure dicts)."""
        return nnx.merge(self.graphdef, variables["params"], variables["router_state"])


def model_spec(model_config: ModelConfig, attention: AttentionConfig | None = None) -> ModelSpec:
    """Builds the model abstractly (no memory, no compute) to read its structure."""
    abstract = nnx.eval_shape(
        lambda: TransformerLM(model_config, attention=attention, rngs=nnx.Rngs(0))
    )
    graphdef, params_state, router_state = nnx.split(abstract, nnx.Param, RouterState)
    return ModelSpec(
        graphdef=graphdef,
        logical_axes=sharding.logical_axes(params_state),
        abstract_params=nnx.to_pure_dict(params_state),
        router_state_axes=sharding.logical_axes(router_state),
        abstract_router_state=nnx.to_pure_dict(router_state),
    )


def state_shardings(spec: ModelSpec, optimizer: optax.GradientTransformation, mesh: Mesh):
    """(abstract state, sharding tree) for the train state on `mesh`."""
    param_shardings = sharding.tree_shardings(mesh, spec.logical_axes)
    abstract_opt = jax.eval_shape(optimizer.init, spec.abstract_params)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shardings = sharding.like_params(
        abstract_opt, spec.abstract_params, param_shardings, replicated
    )
    abstract_state = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": spec.abstract_params,
        "opt_state": abstract_opt,
    }
    shardings = {
        "step": replicated,
        "params": param_shardings,
        "opt_state": opt_shardings,
    }
    if spec.abstract_router_state:
        abstract_state["router_state"] = spec.abstract_router_state
        shardings["router_state"] = sharding.tree_shardings(mesh, spec.router_state_axes)
    return abstract_state, shardings


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that carry their target sharding (what Orbax restores onto)."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
    )


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """What a config and a mesh determine about the train state: the model's structure, the
    optimizer and its schedule, the state's shapes and its shardings."""

    spec: ModelSpec
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    abstract_state: Any
    shardings: Any
    # train.seed: with the step it determines the routing-noise key of every step, so the noise
    # needs no state of its own and a resumed run draws the same noise.
    seed: int = 0
    # What the train step does with the masks; None when pruning is off.
    pruning: LMPruning | None = None

    def restore_target(self) -> Any:
        """The abstract state carrying its shardings: what checkpoints restore onto."""
        return abstract_with_shardings(self.abstract_state, self.shardings)


def state_layout(config: Config, mesh: Mesh) -> StateLayout:
    spec = model_spec(config.model, config.attention)
    try:
        pruning = LMPruning.create(config.pruning, spec.abstract_params)
    except ValueError as error:
        # A pruning group that cannot prune this model's parameters is a config error.
        raise ConfigError(str(error)) from None
    optimizer = make_optimizer(config.train, config.pruning)
    abstract_state, shardings = state_shardings(spec, optimizer, mesh)
    schedule = learning_rate_schedule(config.train)
    return StateLayout(
        spec, optimizer, schedule, abstract_state, shardings, config.train.seed, pruning
    )


def pretrained_values(config: Config, layout: StateLayout) -> dict[str, dict]:
    """`config.train.init_from_hf`'s arrays for this run's model, placed like its parameters
    ({"params", "router_state"} pure dicts holding what the checkpoint has); empty without
    one."""
    if not config.train.init_from_hf:
        return {"params": {}, "router_state": {}}
    from moejax.pretrained import load_state

    mesh = jax.tree.leaves(layout.shardings)[0].mesh
    values, left_out = load_state(config.train.init_from_hf, config.model, mesh=mesh, strict=False)
    if left_out:
        log.info(
            "init_from_hf: %d arrays start from their random init (%s%s)",
            len(left_out),
            ", ".join(left_out[:4]),
            ", ..." if len(left_out) > 4 else "",
        )
    return values


def _overlay(initial: Any, loaded: Any) -> Any:
    """`initial` (a pure dict) with the leaves `loaded` holds replaced by them."""
    if not isinstance(initial, dict):
        return loaded
    return {
        key: _overlay(value, loaded[key]) if key in loaded else value
        for key, value in initial.items()
    }


def init_state(
    config: Config, layout: StateLayout, values: dict[str, dict] | None = None
) -> TrainState:
    """Initialises parameters and optimizer state directly in their sharded layout; with
    `train.init_from_hf` the parameters start from that checkpoint, and with `values`
    ({"params"[, "router_state"]} pure dicts, as `pretrained_values`) from those arrays (a
    compressed model of a new architecture)."""
    if values is None:
        values = pretrained_values(config, layout)
    values = {"params": {}, "router_state": {}, **values}

    def init(key: jax.Array, loaded: dict[str, dict]) -> TrainState:
        model = TransformerLM(config.model, attention=config.attention, rngs=nnx.Rngs(key))
        params = _overlay(nnx.to_pure_dict(nnx.state(model, nnx.Param)), loaded["params"])
        opt_state = layout.optimizer.init(params)
        if layout.pruning is not None:
            opt_state = layout.pruning.record(opt_state, params)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state}
        if layout.spec.abstract_router_state:
            router_state = nnx.to_pure_dict(nnx.state(model, RouterState))
            state["router_state"] = _overlay(router_state, loaded["router_state"])
        return state

    platforms = {leaf.mesh.devices.flat[0].platform for leaf in jax.tree.leaves(layout.shardings)}
    # Initialisation runs once. XLA:CPU spends most of its compile at LLVM's default level on
    # the partitionable threefry fusions, one per parameter (7 s of a tiny model's start-up,
    # more than its train step); at level 1 it compiles in a third of that. Only the
    # initial values' last float32 bits depend on the level, and every process uses the same.
    options = {"xla_backend_optimization_level": 1} if platforms == {"cpu"} else None
    return jax.jit(init, out_shardings=layout.shardings, compiler_options=options)(
        jax.random.key(config.train.seed), values
    )


def count_params(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
