"""Stateful routers inside the MoE layer: the state follows its documented update rule and
stays outside the gradient (no gradient reaches or leaves it, and the step's gradient is the
same with or without the update); the train step carries the updated state."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import routers
from moejax.config import apply_overrides, load_config_file
from moejax.models.moe_layer import MoELayer
from moejax.parallel import sharding
from moejax.routers.base import RouterState
from moejax.routers.bias_balanced import BIAS_UPDATE_RATE
from moejax.routers.kmeans import CENTROID_MOMENTUM
from moejax.training import state as state_lib
from moejax.training.step import global_batch, make_train_step
from tests.routers.layer_helpers import D_MODEL, EXPERTS, TOP_K, make_layer

ROUTERS = ["bias_balanced", "kmeans"]
TOKENS = 24


def _layer(router: str, seed: int = 0) -> MoELayer:
    layer = make_layer(router, seed)
    if router == "bias_balanced":
        # A bias that changes the choice, so routing with a stale or updated bias would show.
        layer.router_state[...] = jnp.array([0.3, -0.2, 0.05, -0.1], jnp.float32)
    return layer


def _hidden(seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (2, TOKENS // 2, D_MODEL))


def _expected_state(router: str, layer: MoELayer, x: jax.Array) -> np.ndarray:
    """One update by hand, in float64, from the state before the step."""
    tokens = np.asarray(x, np.float64).reshape(-1, D_MODEL)
    state = np.asarray(layer.router_state[...], np.float64)
    if router == "bias_balanced":
        probs = np.asarray(jax.nn.softmax(jnp.asarray(tokens, jnp.float32) @ layer.router[...]))
        chosen = np.argsort(-(probs + state), axis=-1, kind="stable")[:, :TOP_K]
        counts = np.bincount(chosen.ravel(), minlength=EXPERTS).astype(np.float64)
        return state + BIAS_UPDATE_RATE * np.sign(counts.mean() - counts)
    unit = tokens / np.linalg.norm(tokens, axis=-1, keepdims=True)
    centroids = state / np.linalg.norm(state, axis=-1, keepdims=True)
    top1 = np.argmax(unit @ centroids.T, axis=-1)
    momentum = CENTROID_MOMENTUM
    want = state.copy()
    for e in range(EXPERTS):
        if np.any(top1 == e):
            want[e] = momentum * state[e] + (1 - momentum) * unit[top1 == e].mean(axis=0)
    return want


@pytest.mark.parametrize("router", ROUTERS)
def test_training_call_updates_router_state_by_the_documented_rule(router: str) -> None:
    layer, x = _layer(router), _hidden()
    want = _expected_state(router, layer, x)
    assert not np.allclose(want, np.asarray(layer.router_state[...]))
    layer(x, train=True)
    np.testing.assert_allclose(layer.router_state[...], want, rtol=1e-5, atol=1e-6)
    before = np.asarray(layer.router_state[...])
    layer(x, train=False)
    np.testing.assert_array_equal(layer.router_state[...], before)


def _split(router: str):
    graphdef, params, state = nnx.split(_layer(router), nnx.Param, RouterState)
    params, state = nnx.to_pure_dict(params), nnx.to_pure_dict(state)
    assert "router_state" not in params and "router_state" in state
    return graphdef, params, state


@pytest.mark.parametrize("router", ROUTERS)
def test_no_gradient_reaches_the_updated_router_state(router: str) -> None:
    graphdef, params, state = _split(router)
    weights = jax.random.normal(jax.random.key(2), state["router_state"].shape)

    def weighted_new_state(params, x, state):
        layer = nnx.merge(graphdef, params, state)
        layer(x, train=True)
        return jnp.sum(weights * layer.router_state[...])

    # Compiled, as in the train step (and faster than autodiff run op by op).
    grads = jax.jit(jax.grad(weighted_new_state, argnums=(0, 1)))(params, _hidden(), state)
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        np.testing.assert_array_equal(leaf, 0.0, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("router", ROUTERS)
def test_state_update_leaves_the_steps_loss_and_gradient_unchanged(router: str) -> None:
    weights = jax.random.normal(jax.random.key(3), (2, TOKENS // 2, D_MODEL))

    def loss_and_grad(update: bool):
        spec = routers.get(router)
        if not update:
            frozen = dataclasses.replace(spec.state, update=lambda state, hidden, routing: state)
            spec = dataclasses.replace(spec, state=frozen)
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(routers.ROUTERS, router, spec)
            graphdef, params, state = _split(router)

        def loss(params, state):
            out, aux, _ = nnx.merge(graphdef, params, state)(_hidden(), train=True)
            return jnp.sum(weights * out) + aux["aux_loss"]

        # Compiled, as in the train step: each variant is its own program.
        return jax.jit(jax.value_and_grad(loss))(params, state)

    (value, grads), (value_frozen, grads_frozen) = loss_and_grad(True), loss_and_grad(False)
    np.testing.assert_array_equal(value, value_frozen)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_frozen), strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("router", ["bias_balanced", "kmeans"])
def test_train_step_updates_router_state_outside_the_gradient(router):
    # One MoE layer and a small batch: compiling the step is the cost, and one stateful layer
    # shows the property as well as two.
    config = apply_overrides(
        load_config_file("configs/tiny.py"),
        [
            f"model.router.name={router}",
            "model.num_layers=1",
            "data.seq_len=8",
            "data.global_batch_size=2",
        ],
    )
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, jax.devices()[:1])
    layout = state_lib.state_layout(config, mesh)
    state = state_lib.init_state(config, layout)
    before = jax.device_get(state["router_state"])
    assert jax.tree.leaves(before)
    step = make_train_step(layout, mesh)
    rows, length = config.data.global_batch_size, config.data.seq_len + 1
    tokens = np.arange(rows * length).reshape(rows, length).astype(np.int32) % 256
    batch = global_batch(mesh, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    state, metrics = step(state, batch)
    after = jax.device_get(state["router_state"])
    changed = [
        np.abs(a - b).max()
        for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True)
    ]
    assert max(changed) > 0.0
    assert np.isfinite(float(metrics["loss"]))
    model = layout.spec.merge(jax.device_get(state_lib.model_variables(state)))
    assert isinstance(model, nnx.Module)
