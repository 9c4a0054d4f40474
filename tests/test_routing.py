"""Routers, their auxiliary losses and routing statistics."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.routers.base import ROUTERS, RouterSpec, register
from moejax.routing import (
    Routing,
    get_router,
    load_balance_loss,
    router_z_loss,
    routing_statistics,
    softmax_top_k,
)


def _logits(tokens: int, experts: int, seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (tokens, experts)) * 2.0


@settings(max_examples=25, deadline=None)
@given(
    tokens=st.integers(1, 12),
    experts=st.integers(1, 8),
    data=st.data(),
)
def test_softmax_top_k_picks_the_k_largest_logits(
    tokens: int, experts: int, data: st.DataObject
) -> None:
    top_k = data.draw(st.integers(1, experts))
    # A random permutation per token: distinct logits, so there are no ties to break.
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    logits = np.stack([rng.permutation(experts) for _ in range(tokens)]).astype(np.float32)
    # jit compiles the router once per shape; eager mode would compile each op separately.
    routing = jax.jit(softmax_top_k, static_argnames="top_k")(jnp.asarray(logits), top_k=top_k)
    chex.assert_shape(routing.expert_index, (tokens, top_k))
    chex.assert_type(routing.expert_index, jnp.int32)
    expected = np.argsort(-logits, axis=-1)[:, :top_k]
    np.testing.assert_array_equal(routing.expert_index, expected)


def test_softmax_top_k_routes_in_float32_for_bf16_logits() -> None:
    routing = softmax_top_k(_logits(6, 4).astype(jnp.bfloat16), top_k=2)
    chex.assert_type(
        [routing.combine_weights, routing.router_probs, *routing.aux_losses.values()],
        jnp.float32,
    )
    chex.assert_shape(routing.router_probs, (6, 4))


def test_renormalized_combine_weights_sum_to_one() -> None:
    routing = softmax_top_k(_logits(16, 8), top_k=3)
    np.testing.assert_allclose(jnp.sum(routing.combine_weights, axis=-1), 1.0, rtol=1e-6)


def test_unnormalized_combine_weights_are_the_router_probs() -> None:
    routing = softmax_top_k(_logits(16, 8), top_k=3, renormalize=False)
    chosen = jnp.take_along_axis(routing.router_probs, routing.expert_index, axis=-1)
    np.testing.assert_array_equal(routing.combine_weights, chosen)
    np.testing.assert_allclose(jnp.sum(routing.router_probs, axis=-1), 1.0, rtol=1e-6)


def test_load_balance_loss_is_one_for_uniform_routing() -> None:
    num_experts = 4
    # Token t picks experts t and t+1 (mod 4): every expert gets the same share of assignments.
    tokens = jnp.arange(8)
    expert_index = jnp.stack([tokens % num_experts, (tokens + 1) % num_experts], axis=-1)
    router_probs = jnp.full((8, num_experts), 1.0 / num_experts)
    loss = load_balance_loss(router_probs, expert_index)
    np.testing.assert_allclose(loss, 1.0, rtol=1e-6)
    # Uniform logits through the router itself: top_k breaks ties, but probabilities are uniform.
    routing = softmax_top_k(jnp.zeros((8, num_experts)), top_k=num_experts)
    np.testing.assert_allclose(routing.aux_losses["load_balance"], 1.0, rtol=1e-6)


def test_load_balance_loss_is_num_experts_when_routing_collapses() -> None:
    num_experts = 5
    logits = jnp.zeros((10, num_experts)).at[:, 2].set(1e4)
    routing = softmax_top_k(logits, top_k=1)
    np.testing.assert_array_equal(routing.expert_index, 2)
    np.testing.assert_allclose(routing.aux_losses["load_balance"], num_experts, rtol=1e-6)


def test_load_balance_loss_exceeds_one_for_skewed_routing() -> None:
    logits = _logits(64, 4).at[:, 0].add(2.0)
    assert softmax_top_k(logits, top_k=2).aux_losses["load_balance"] > 1.0


def test_router_z_loss_is_mean_squared_logsumexp() -> None:
    logits = np.asarray(_logits(9, 6, seed=3))
    log_z = np.log(np.sum(np.exp(logits.astype(np.float64)), axis=-1))
    np.testing.assert_allclose(router_z_loss(jnp.asarray(logits)), np.mean(log_z**2), rtol=1e-6)
    routing = softmax_top_k(jnp.asarray(logits), top_k=2)
    np.testing.assert_allclose(routing.aux_losses["router_z"], np.mean(log_z**2), rtol=1e-6)


def test_aux_losses_are_differentiable_through_router_probs() -> None:
    def total_aux(logits: jax.Array) -> jax.Array:
        losses = softmax_top_k(logits, top_k=2).aux_losses
        return losses["load_balance"] + losses["router_z"]

    grad = jax.grad(total_aux)(_logits(8, 4))
    assert bool(jnp.all(jnp.isfinite(grad))) and bool(jnp.any(grad != 0))


@pytest.mark.parametrize("top_k", [0, 5])
def test_softmax_top_k_rejects_top_k_out_of_range(top_k: int) -> None:
    with pytest.raises(ValueError, match=rf"top_k: got {top_k}; allowed: 1 <= top_k"):
        softmax_top_k(_logits(3, 4), top_k=top_k)


def test_softmax_top_k_is_registered_and_jits() -> None:
    assert "softmax_top_k" in ROUTERS
    router = get_router("softmax_top_k")
    assert router is softmax_top_k
    routing = jax.jit(router, static_argnames="top_k")(_logits(5, 4), top_k=2)
    assert isinstance(routing, Routing)
    assert set(routing.aux_losses) == {"load_balance", "router_z"}


def test_get_router_names_unknown_router_and_allowed() -> None:
    with pytest.raises(ValueError, match=r"router: got 'foo'; allowed: softmax_top_k, "):
        get_router("foo")


def test_register_rejects_duplicate_names() -> None:
    with pytest.raises(
        ValueError, match="router: got 'softmax_top_k'; allowed: a name not already"
    ):
        register(RouterSpec("softmax_top_k", softmax_top_k))


def test_routing_statistics_loads_sum_to_one() -> None:
    num_experts = 6
    routing = softmax_top_k(_logits(32, num_experts, seed=4), top_k=2)
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
        routing_statistics(softmax_top_k(_logits(4, 4), top_k=1), 3)
