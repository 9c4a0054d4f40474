"""Routers with state updated outside the gradient: auxiliary-loss-free bias and online k-means."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import sharding
from moejax.config import apply_overrides, load_config_file
from moejax.routers.bias_balanced import bias_balanced_top_k, update_expert_bias
from moejax.routers.kmeans import kmeans_router, update_centroids
from moejax.routing import softmax_top_k
from moejax.training import state as state_lib
from moejax.training.step import global_batch, make_train_step


def test_zero_bias_is_softmax_top_k():
    logits = jax.random.normal(jax.random.key(0), (16, 6))
    a, b = bias_balanced_top_k(logits, top_k=2), softmax_top_k(logits, top_k=2)
    np.testing.assert_array_equal(a.expert_index, b.expert_index)
    np.testing.assert_allclose(a.combine_weights, b.combine_weights, rtol=1e-6)


def test_bias_steers_selection_but_not_weights():
    logits = jax.random.normal(jax.random.key(1), (32, 4))
    bias = jnp.array([0.0, 0.0, 10.0, 0.0])
    routing = bias_balanced_top_k(logits, top_k=1, renormalize=False, expert_bias=bias)
    assert np.all(np.asarray(routing.expert_index) == 2)
    probs = np.asarray(jax.nn.softmax(logits))
    np.testing.assert_allclose(routing.combine_weights[:, 0], probs[:, 2], rtol=1e-6)
    grad = jax.grad(
        lambda b: jnp.sum(bias_balanced_top_k(logits, top_k=1, expert_bias=b).combine_weights)
    )(bias)
    np.testing.assert_array_equal(grad, 0.0)


def test_bias_update_moves_against_the_load_error():
    index = jnp.array([[0], [0], [0], [1]])
    bias = update_expert_bias(jnp.zeros(3), index, rate=0.5)
    np.testing.assert_allclose(bias, [-0.5, 0.5, 0.5])


def test_bias_updates_balance_a_skewed_router():
    logits = jax.random.normal(jax.random.key(2), (512, 4)) + jnp.array([2.0, 0.0, 0.0, -1.0])
    bias = jnp.zeros(4)

    def load(bias):
        index = bias_balanced_top_k(logits, top_k=1, expert_bias=bias).expert_index
        return np.bincount(np.asarray(index).ravel(), minlength=4) / 512

    assert load(bias).max() > 0.6
    for _ in range(400):
        index = bias_balanced_top_k(logits, top_k=1, expert_bias=bias).expert_index
        bias = update_expert_bias(bias, index, rate=0.01)
    assert load(bias).max() / load(bias).mean() < 1.15


def test_kmeans_routes_to_most_similar_centroid():
    hidden = jax.random.normal(jax.random.key(3), (20, 8))
    centroids = jax.random.normal(jax.random.key(4), (5, 8))
    routing = kmeans_router(jnp.zeros((20, 5)), top_k=2, hidden=hidden, centroids=centroids)
    h = np.asarray(hidden, np.float64)
    c = np.asarray(centroids, np.float64)
    cos = (h / np.linalg.norm(h, axis=1, keepdims=True)) @ (
        c / np.linalg.norm(c, axis=1, keepdims=True)
    ).T
    np.testing.assert_array_equal(routing.expert_index[:, 0], cos.argmax(1))
    np.testing.assert_allclose(np.sum(routing.combine_weights, 1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="centroids"):
        kmeans_router(jnp.zeros((20, 5)), top_k=2, hidden=hidden)


def test_centroid_update_is_a_running_mean_and_keeps_empty_clusters():
    centroids = jnp.eye(3, 4)
    hidden = jnp.array([[2.0, 0, 0, 0], [0, 0, 0, 3.0]])
    index = jnp.array([[0, 1], [0, 2]])
    new = np.asarray(update_centroids(centroids, hidden, index, momentum=0.5))
    np.testing.assert_allclose(new[0], 0.5 * np.eye(3, 4)[0] + 0.5 * np.array([0.5, 0, 0, 0.5]))
    np.testing.assert_array_equal(new[1:], np.eye(3, 4)[1:])


@pytest.mark.parametrize("router", ["bias_balanced", "kmeans"])
def test_train_step_updates_router_state_outside_the_gradient(router):
    config = apply_overrides(load_config_file("configs/tiny.py"), [f"model.router={router}"])
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, jax.devices()[:1])
    layout = state_lib.state_layout(config, mesh)
    state = state_lib.init_state(config, layout)
    before = jax.device_get(state["router_state"])
    assert jax.tree.leaves(before)
    step = make_train_step(layout, mesh)
    tokens = np.arange(8 * 33).reshape(8, 33).astype(np.int32) % 256
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
