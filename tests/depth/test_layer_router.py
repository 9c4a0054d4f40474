"""Dr.LLM layer routing (`moejax.depth.layer_router`): skip / execute / repeat per sequence."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from depth_toy_block import D_MODEL, causal_block, depth_inputs

from moejax import depth


def test_routed_block_skip_execute_repeat_apply_the_block_zero_one_two_times() -> None:
    x, _ = depth_inputs(3, 6, seed=10)
    router = depth.init_layer_router(jax.random.key(11), D_MODEL, hidden_dim=4)
    decision = jnp.asarray([depth.SKIP, depth.EXECUTE, depth.REPEAT])
    y, out_decision = depth.routed_block(x, router, causal_block, decision=decision)
    np.testing.assert_array_equal(out_decision, decision)
    np.testing.assert_array_equal(y[0], x[0])
    once = x + causal_block(x)
    twice = once + causal_block(once)
    np.testing.assert_allclose(y[1], once[1], rtol=1e-6)
    np.testing.assert_allclose(y[2], twice[2], rtol=1e-6)
    chex.assert_shape(y, x.shape)


def test_routed_block_without_labels_follows_the_router_argmax() -> None:
    x, _ = depth_inputs(4, 5, seed=12)
    router = depth.init_layer_router(jax.random.key(13), D_MODEL, hidden_dim=4)
    router["w_out"] = jax.random.normal(jax.random.key(14), router["w_out"].shape)
    logits = depth.layer_router_logits(x, router)
    chex.assert_shape(logits, (4, 3))
    _, decision = depth.routed_block(x, router, causal_block)
    np.testing.assert_array_equal(decision, np.argmax(np.asarray(logits), axis=-1))
    chex.assert_type(decision, jnp.int32)


def test_layer_router_loss_equals_numpy_cross_entropy() -> None:
    logits = jax.random.normal(jax.random.key(15), (6, 3)) * 2
    labels = jnp.asarray([0, 1, 2, 1, 1, 0])
    lg = np.asarray(logits, np.float64)
    log_probs = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
    picked = log_probs[np.arange(6), np.asarray(labels)]
    np.testing.assert_allclose(depth.layer_router_loss(logits, labels), -picked.mean(), rtol=1e-6)

    weights = np.asarray([2.0, 0.5, 1.0])
    gamma = 2.0
    focal = -((1 - np.exp(picked)) ** gamma) * picked
    w = weights[np.asarray(labels)]
    np.testing.assert_allclose(
        depth.layer_router_loss(
            logits, labels, class_weights=jnp.asarray(weights), focal_gamma=gamma
        ),
        (w * focal).sum() / w.sum(),
        rtol=1e-5,
    )


def test_layer_router_loss_trains_the_router() -> None:
    x, _ = depth_inputs(4, 5, seed=16)
    router = depth.init_layer_router(jax.random.key(17), D_MODEL, hidden_dim=4)
    labels = jnp.asarray([0, 2, 1, 2])
    grads = jax.grad(lambda p: depth.layer_router_loss(depth.layer_router_logits(x, p), labels))(
        router
    )
    assert float(jnp.abs(grads["w_out"]).sum()) > 0


def test_greedy_decisions_pick_the_cheapest_lowest_loss_action() -> None:
    losses = jnp.asarray([[1.0, 0.5, 0.4], [0.3, 0.5, 0.6], [1.0, 1.0, 1.0], [2.0, 1.0, 0.95]])
    np.testing.assert_array_equal(depth.greedy_decisions(losses), [2, 0, 0, 2])
    np.testing.assert_array_equal(depth.greedy_decisions(losses, compute_penalty=0.1), [1, 0, 0, 1])


def test_layer_router_rejects_bad_options() -> None:
    x, _ = depth_inputs(2, 3)
    router = depth.init_layer_router(jax.random.key(0), D_MODEL, hidden_dim=2)
    with pytest.raises(ValueError, match="decision"):
        depth.routed_block(x, router, causal_block, decision=jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="router_params"):
        depth.layer_router_logits(x, {"w_in": router["w_in"]})
    with pytest.raises(ValueError, match="focal_gamma"):
        depth.layer_router_loss(jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32), focal_gamma=-1)
    with pytest.raises(ValueError, match="compute_penalty"):
        depth.greedy_decisions(jnp.zeros((2, 3)), compute_penalty=-1)
    with pytest.raises(ValueError, match="hidden_dim"):
        depth.init_layer_router(jax.random.key(0), D_MODEL, hidden_dim=0)


@pytest.mark.parametrize("focal_gamma", [0.0, 0.5, 2.0])
def test_layer_router_loss_gradient_stays_finite_for_a_certain_router(focal_gamma):
    logits = jnp.array([[0.0, 30.0, 0.0], [30.0, 0.0, 0.0]])
    labels = jnp.array([1, 0])
    grad = jax.grad(lambda z: depth.layer_router_loss(z, labels, focal_gamma=focal_gamma))(logits)
    assert bool(jnp.all(jnp.isfinite(grad)))
