"""The jit-compiled train and eval steps, with explicit shardings and a donated state."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moejax.models.moe_layer import ROUTING_TRACE_KEYS
from moejax.parallel import sharding
from moejax.routers.base import RouterState
from moejax.training.state import ModelSpec, StateLayout, TrainState

Batch = dict[str, jax.Array]  # {"inputs": [batch, length] int32, "targets": [batch, length]}


@dataclasses.dataclass(frozen=True)
class MeshStep:
    """A jitted step that runs (and compiles) inside its mesh context."""

    jitted: Any
    mesh: Mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def compile(self, *args):
        """Ahead-of-time compilation for `args` (arrays or ShapeDtypeStructs)."""
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args).compile()


def cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Summed next-token negative log-likelihood (nats) and the number of tokens.

    `logits [batch, length, vocab]` float32, `targets [batch, length]` int32.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [b, l]
    return jnp.sum(nll), jnp.asarray(targets.size, jnp.float32)


def _moe_metrics(aux_per_layer: list[dict | None]) -> dict[str, jax.Array]:
    """Flattens per-layer routing statistics to `moe/layer{i}/{name}` scalars and vectors."""
    metrics = {}
    for layer, aux in enumerate(aux_per_layer):
        if aux is None:
            continue
        for name, value in aux.items():
            if name == "aux_loss" or name in ROUTING_TRACE_KEYS:
                continue
            if name.startswith(("attention_", "flux_")):
                metrics[f"attention/layer{layer}/{name}"] = value
            else:
                metrics[f"moe/layer{layer}/{name}"] = value
    return metrics


def routing_noise_key(seed: int, step: jax.Array) -> jax.Array:
    """The key of step `step`'s routing noise: a function of the seed and the step only."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _NOISE_STREAM), step)


# Separates the noise stream from the parameter initialisation, which also uses key(seed).
_NOISE_STREAM = 1


def forward(spec: ModelSpec, variables: dict[str, Any], batch: Batch, rng: jax.Array | None = None):
    """Loss pieces of one training batch: (mean cross-entropy, summed aux loss, per-layer aux
    list, the router state after this batch). `rng` feeds routers with noise."""
    model = spec.merge(variables)
    logits, aux_per_layer = model(batch["inputs"], rng=rng)
    nll_sum, count = cross_entropy(logits, batch["targets"])
    aux_loss = sum((aux["aux_loss"] for aux in aux_per_layer if aux is not None), jnp.float32(0.0))
    router_state = nnx.to_pure_dict(nnx.state(model, RouterState))
    return nll_sum / count, aux_loss, aux_per_layer, router_state


def make_train_step(layout: StateLayout, mesh: Mesh) -> MeshStep:
    """`train_step(state, batch) -> (state, metrics)`, jit-compiled, state donated."""
    spec, optimizer, schedule = layout.spec, layout.optimizer, layout.schedule
    pruning = layout.pruning

    def train_step(state: TrainState, batch: Batch):
        rng = routing_noise_key(layout.seed, state["step"])

        def loss_fn(params):
            if pruning is not None:
                # Masked weights (or SR-STE's n:m projection) in the forward pass; the dense
                # params stay the differentiated variable.
                params = pruning.forward_params(params, state["opt_state"], state["step"])
            variables = {"params": params, "router_state": state.get("router_state", {})}
            ce, aux_loss, aux_per_layer, router_state = forward(spec, variables, batch, rng)
            return ce + aux_loss, (ce, aux_loss, aux_per_layer, router_state)

        grads, (ce, aux_loss, aux_per_layer, router_state) = jax.grad(loss_fn, has_aux=True)(
            state["params"]
        )
        opt_state = state["opt_state"]
        if pruning is not None:
            opt_state = pruning.release(opt_state, state["params"])
        updates, opt_state = optimizer.update(grads, opt_state, state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            "loss": ce + aux_loss,
            "ce_loss": ce,
            "aux_loss": aux_loss,
            "grad_norm": optax.tree.norm(grads),
            "learning_rate": schedule(state["step"]),
            **_moe_metrics(aux_per_layer),
        }
        if pruning is not None:
            opt_state = pruning.record(opt_state, params)
            metrics.update(pruning.metrics(opt_state))
        new_state = {
            "step": state["step"] + 1,
            "params": params,
            "opt_state": opt_state,
        }
        if "router_state" in state:
            new_state["router_state"] = router_state
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    batch_shardings = {
        "inputs": sharding.batch_sharding(mesh),
        "targets": sharding.batch_sharding(mesh),
    }
    jitted = jax.jit(
        train_step,
        in_shardings=(layout.shardings, batch_shardings),
        out_shardings=(layout.shardings, replicated),
        donate_argnums=0,
    )

    return MeshStep(jitted, mesh)


def make_eval_step(layout: StateLayout, mesh: Mesh) -> MeshStep:
    """`eval_step(variables, batch) -> sums` of nll (nats), tokens, and per-layer routing stats;
    `variables` = `state.model_variables(train_state)`."""
    spec = layout.spec
    variable_shardings = {
        "params": layout.shardings["params"],
        "router_state": layout.shardings.get("router_state", {}),
    }

    def eval_step(variables: dict[str, Any], batch: Batch):
        model = spec.merge(variables)
        logits, aux_per_layer = model(batch["inputs"], train=False)
        nll_sum, count = cross_entropy(logits, batch["targets"])
        return {"nll_sum": nll_sum, "tokens": count, **_moe_metrics(aux_per_layer)}

    replicated = NamedSharding(mesh, PartitionSpec())
    batch_shardings = {
        "inputs": sharding.batch_sharding(mesh),
        "targets": sharding.batch_sharding(mesh),
    }
    jitted = jax.jit(
        eval_step, in_shardings=(variable_shardings, batch_shardings), out_shardings=replicated
    )

    return MeshStep(jitted, mesh)


def global_batch(mesh: Mesh, local_batch: dict[str, Any]) -> Batch:
    """Assembles this process's rows into global arrays sharded over the batch axes."""
    target = sharding.batch_sharding(mesh)
    return {
        name: jax.make_array_from_process_local_data(target, value)
        for name, value in local_batch.items()
    }
