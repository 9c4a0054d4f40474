"""Selective Sinkhorn: a chosen share of the tokens follows the Sinkhorn plan, the rest softmax
top-k."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.routers.selective_sinkhorn import selective_sinkhorn
from moejax.routers.sinkhorn import sinkhorn as sinkhorn_router
from moejax.routers.softmax_top_k import softmax_top_k
from tests.routers.routing_helpers import assert_same_routing, jit_router, normal_logits


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selective_sinkhorn_balances_logits_that_all_prefer_one_expert(
    top_k: int, seed: int
) -> None:
    tokens, experts = 64, 4
    logits = normal_logits(tokens, experts, seed=seed).at[:, 0].add(10.0)
    softmax_load = np.bincount(softmax_top_k(logits, top_k=top_k).expert_index[:, 0], None, 4)
    assert softmax_load[0] == tokens
    # A fraction of 1 routes every token by the plan.
    routed = selective_sinkhorn(logits, top_k=top_k, sinkhorn_fraction=1.0)
    load = np.bincount(np.asarray(routed.expert_index).ravel(), minlength=experts)
    assert load.max() / load.mean() <= 1.25, load
    assert len(np.unique(np.asarray(routed.expert_index), axis=None)) == experts


def test_selective_sinkhorn_replaces_the_balancing_and_z_losses_but_reports_z() -> None:
    logits = normal_logits(16, 4)
    selective = selective_sinkhorn(logits, top_k=2)
    assert float(selective.aux_losses["load_balance"]) == 0.0
    assert float(selective.aux_losses["router_z"]) == 0.0
    assert float(selective.aux_losses["router_z_unweighted"]) > 0.0


def test_selective_sinkhorn_routes_like_softmax_top_k_outside_training() -> None:
    logits = normal_logits(16, 4).at[:, 0].add(10.0)
    expected = softmax_top_k(logits, top_k=2)
    assert_same_routing(
        selective_sinkhorn(logits, top_k=2, train=False, rng=jax.random.key(0)),
        expected,
        exact=False,
    )


def test_selective_sinkhorn_routes_the_chosen_share_of_tokens_by_the_plan() -> None:
    logits = normal_logits(64, 4, seed=4).at[:, 0].add(10.0)
    plan_route = sinkhorn_router(logits, top_k=2, gate_source="plan")
    softmax_route = softmax_top_k(logits, top_k=2)
    # Without a key, tokens 3, 7, 11, ... (every fourth) follow the plan for a fraction of 1/4.
    routed = selective_sinkhorn(logits, top_k=2, sinkhorn_fraction=0.25)
    by_plan = np.arange(64) % 4 == 3
    np.testing.assert_array_equal(routed.expert_index[by_plan], plan_route.expert_index[by_plan])
    np.testing.assert_array_equal(
        routed.expert_index[~by_plan], softmax_route.expert_index[~by_plan]
    )
    np.testing.assert_allclose(
        routed.combine_weights[by_plan], plan_route.combine_weights[by_plan], rtol=1e-6
    )
    # With a key: every token follows one of the two, reproducibly, and both occur.
    jitted = jit_router(selective_sinkhorn, "top_k")
    keyed = jitted(logits, top_k=2, rng=jax.random.key(5), sinkhorn_fraction=0.5)
    again = jitted(logits, top_k=2, rng=jax.random.key(5), sinkhorn_fraction=0.5)
    np.testing.assert_array_equal(keyed.expert_index, again.expert_index)
    is_plan = np.all(keyed.expert_index == plan_route.expert_index, axis=-1)
    is_softmax = np.all(keyed.expert_index == softmax_route.expert_index, axis=-1)
    assert np.all(is_plan | is_softmax)
    differs = ~np.all(plan_route.expert_index == softmax_route.expert_index, axis=-1)
    assert 0.2 < np.mean(is_plan[differs]) < 0.8
    # A fraction of 0 is softmax top-k.
    none = selective_sinkhorn(logits, top_k=2, sinkhorn_fraction=0.0, rng=jax.random.key(5))
    np.testing.assert_array_equal(none.expert_index, softmax_route.expert_index)


def test_selective_sinkhorn_gates_differentiate_through_the_plan() -> None:
    def total_gate_on_expert_0(logits: jax.Array) -> jax.Array:
        routed = selective_sinkhorn(logits, top_k=1, sinkhorn_fraction=1.0, renormalize=False)
        return jnp.sum(jnp.where(routed.expert_index == 0, routed.combine_weights, 0.0))

    grad = jax.jit(jax.grad(total_gate_on_expert_0))(normal_logits(16, 4, seed=6))
    assert bool(jnp.all(jnp.isfinite(grad))) and bool(jnp.any(grad != 0.0))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"sinkhorn_fraction": 1.5}, r"sinkhorn_fraction: got 1.5"),
        ({"num_iters": 0, "train": False}, r"num_iters: got 0"),
    ],
)
def test_selective_sinkhorn_rejects_bad_options(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        selective_sinkhorn(normal_logits(4, 4), top_k=1, **options)
