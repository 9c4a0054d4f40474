"""`moejax.routers.base` besides the registry (tests in test_registry.py): routing statistics."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.routers.base import routing_statistics
from moejax.routers.softmax_top_k import softmax_top_k
from tests.routers.routing_helpers import key_logits


def test_routing_statistics_loads_sum_to_one() -> None:
    num_experts = 6
    routing = softmax_top_k(key_logits(32, num_experts, seed=4), top_k=2)
    stats = routing_statistics(routing, num_experts)
    chex.assert_shape(stats["expert_load"], (num_experts,))
    np.testing.assert_allclose(jnp.sum(stats["expert_load"]), 1.0, rtol=1e-6)
    counts = np.bincount(np.asarray(routing.expert_index).ravel(), minlength=num_experts)
    np.testing.assert_allclose(stats["expert_load"], counts / counts.sum(), rtol=1e-6)
    np.testing.assert_allclose(stats["load_max_over_mean"], counts.max() / counts.mean(), rtol=1e-6)
    probs = np.asarray(routing.router_probs, dtype=np.float64)
    entropy = -np.sum(probs * np.log(probs), axis=-1).mean()
    np.testing.assert_allclose(stats["routing_entropy"], entropy, rtol=1e-5)


def test_routing_statistics_extremes() -> None:
    num_experts = 4
    uniform = routing_statistics(softmax_top_k(jnp.zeros((8, 4)), top_k=4), num_experts)
    np.testing.assert_allclose(uniform["load_max_over_mean"], 1.0, rtol=1e-6)
    np.testing.assert_allclose(uniform["routing_entropy"], np.log(num_experts), rtol=1e-6)
    # A one-hot router: zero entropy (0 log 0 counted as 0) and all load on one expert.
    collapsed = softmax_top_k(jnp.zeros((8, 4)).at[:, 1].set(1e4), top_k=1)
    stats = routing_statistics(collapsed, num_experts)
    np.testing.assert_allclose(stats["load_max_over_mean"], num_experts, rtol=1e-6)
    np.testing.assert_allclose(stats["routing_entropy"], 0.0, atol=1e-6)


def test_routing_statistics_rejects_wrong_num_experts() -> None:
    with pytest.raises(ValueError, match="num_experts: got 3"):
        routing_statistics(softmax_top_k(key_logits(4, 4), top_k=1), 3)
