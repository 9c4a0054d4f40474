"""Auxiliary-loss-free balancing: a per-expert bias, updated outside the gradient, steers the
choice of experts but not their weights."""

import jax
import jax.numpy as jnp
import numpy as np

from moejax.routers.bias_balanced import bias_balanced_top_k, update_expert_bias
from moejax.routers.softmax_top_k import softmax_top_k


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
