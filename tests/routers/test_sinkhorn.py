"""Sinkhorn routing: a balanced transport plan picks the experts in training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.routers.losses import load_balance_loss
from moejax.routers.sinkhorn import sinkhorn as sinkhorn_router
from moejax.routers.sinkhorn import sinkhorn_log_plan
from moejax.routers.softmax_top_k import softmax_top_k
from tests.routers.routing_helpers import assert_same_routing, normal_logits


def _sinkhorn_reference(logits: np.ndarray, top_k: int, num_iters: int, tolerance: float):
    """The same log-space iterations and stopping rule in float64 numpy; returns the plan."""
    logits = np.asarray(logits, np.float64)
    tokens, experts = logits.shape

    def logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
        peak = a.max(axis=axis, keepdims=True)
        return (peak + np.log(np.exp(a - peak).sum(axis=axis, keepdims=True))).squeeze(axis)

    row, column = np.zeros(tokens), np.zeros(experts)
    for i in range(num_iters):
        new_row = np.log(top_k) - logsumexp(logits + column, axis=1)
        if i > 0 and np.max(np.abs(new_row - row)) < tolerance:
            break
        row = new_row
        column = np.log(tokens * top_k / experts) - logsumexp(logits + row[:, None], axis=0)
    return np.exp(logits + row[:, None] + column)


@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(32, 4, 1), (24, 6, 2), (5, 8, 3)])
def test_sinkhorn_plan_matches_float64_reference_and_marginals(
    tokens: int, experts: int, top_k: int
) -> None:
    logits = normal_logits(tokens, experts, seed=tokens)
    plan_fn = jax.jit(sinkhorn_log_plan, static_argnames=("top_k", "num_iters", "tolerance"))
    plan = np.exp(np.asarray(plan_fn(logits, top_k=top_k, num_iters=200, tolerance=0.0)))
    expected = _sinkhorn_reference(np.asarray(logits), top_k, 200, 0.0)
    np.testing.assert_allclose(plan, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(plan.sum(axis=1), top_k, rtol=1e-4)
    np.testing.assert_allclose(plan.sum(axis=0), tokens * top_k / experts, rtol=1e-4)


def test_sinkhorn_stops_early_at_the_tolerance() -> None:
    logits = normal_logits(16, 4, seed=7)
    plan_fn = jax.jit(sinkhorn_log_plan, static_argnames=("top_k", "num_iters", "tolerance"))
    plan = np.exp(np.asarray(plan_fn(logits, top_k=2, num_iters=500, tolerance=1e-3)))
    expected = _sinkhorn_reference(np.asarray(logits), 2, 500, 1e-3)
    np.testing.assert_allclose(plan, expected, rtol=1e-4, atol=1e-6)
    # Stopped on the row error: rows within ~1e-3 (log scale), columns exact.
    row_error = np.max(np.abs(np.log(plan.sum(axis=1) / 2)))
    assert 1e-5 < row_error < 1e-3
    np.testing.assert_allclose(plan.sum(axis=0), 16 * 2 / 4, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sinkhorn_balances_logits_that_all_prefer_one_expert(top_k: int, seed: int) -> None:
    tokens, experts = 64, 4
    logits = normal_logits(tokens, experts, seed=seed).at[:, 0].add(10.0)
    softmax_load = np.bincount(softmax_top_k(logits, top_k=top_k).expert_index[:, 0], None, 4)
    assert softmax_load[0] == tokens
    routed = sinkhorn_router(logits, top_k=top_k)
    load = np.bincount(np.asarray(routed.expert_index).ravel(), minlength=experts)
    assert load.max() / load.mean() <= 1.25, load
    assert len(np.unique(np.asarray(routed.expert_index), axis=None)) == experts


def test_sinkhorn_gates_come_from_softmax_or_plan() -> None:
    logits = normal_logits(12, 4, seed=3).at[:, 1].add(3.0)
    by_softmax = sinkhorn_router(logits, top_k=2, renormalize=False)
    by_plan = sinkhorn_router(logits, top_k=2, renormalize=False, gate_source="plan")
    np.testing.assert_array_equal(by_softmax.expert_index, by_plan.expert_index)
    np.testing.assert_allclose(
        by_softmax.combine_weights,
        jnp.take_along_axis(jax.nn.softmax(logits), by_softmax.expert_index, axis=-1),
        rtol=1e-6,
    )
    # A plan row divided by its mass top_k is a distribution over experts.
    plan = _sinkhorn_reference(np.asarray(logits), 2, 20, 1e-6) / 2
    chosen = np.take_along_axis(plan, np.asarray(by_plan.expert_index), axis=-1)
    np.testing.assert_allclose(by_plan.combine_weights, chosen, rtol=1e-4)
    renormalized = sinkhorn_router(logits, top_k=2, gate_source="plan").combine_weights
    np.testing.assert_allclose(renormalized, chosen / chosen.sum(-1, keepdims=True), rtol=1e-4)


def test_sinkhorn_replaces_the_balancing_loss_but_reports_it() -> None:
    logits = normal_logits(16, 4)
    routed = sinkhorn_router(logits, top_k=2)
    assert float(routed.aux_losses["load_balance"]) == 0.0
    np.testing.assert_allclose(
        routed.aux_losses["load_balance_unweighted"],
        load_balance_loss(routed.router_probs, routed.expert_index),
    )


def test_sinkhorn_routes_like_softmax_top_k_outside_training() -> None:
    logits = normal_logits(16, 4).at[:, 0].add(10.0)
    expected = softmax_top_k(logits, top_k=2)
    assert_same_routing(sinkhorn_router(logits, top_k=2, train=False), expected, exact=False)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_iters": 0}, r"num_iters: got 0; allowed: an int >= 1"),
        ({"tolerance": -1.0}, r"tolerance: got -1.0; allowed: finite and >= 0"),
        ({"gate_source": "x"}, r"gate_source: got 'x'; allowed: softmax, plan"),
    ],
)
def test_sinkhorn_rejects_bad_options(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sinkhorn_router(normal_logits(4, 4), top_k=1, **options)
