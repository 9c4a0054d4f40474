"""Routing fluctuation and inter-layer affinity as evaluation reports them."""

import numpy as np
import pytest

from moejax.evaluation import routing_dynamics, routing_table


def test_fluctuation_and_affinity_of_known_routings():
    top1 = {0: np.array([0, 1, 2, 3, 0, 1]), 2: np.array([1, 2, 3, 0, 1, 2])}
    previous = {0: np.array([0, 1, 0, 0, 0, 1]), 2: np.array([1, 2, 3, 0, 1, 2])}
    results = routing_dynamics(top1, 4, previous)
    assert results["moe/layer0/routing_fluctuation"] == pytest.approx(2 / 6)
    assert results["moe/layer2/routing_fluctuation"] == 0.0
    # Layer 2's expert is layer 0's plus one: a permutation, fully predictable.
    np.testing.assert_array_equal(results["moe/layer2/affinity"], np.roll(np.eye(4), 1, axis=1))
    assert results["moe/layer2/affinity_predictability"] == 1.0
    assert "moe/layer0/affinity" not in results


def test_unrelated_layers_have_low_predictability_and_no_previous_means_no_fluctuation():
    rng = np.random.default_rng(0)
    top1 = {0: rng.integers(0, 8, 20_000), 1: rng.integers(0, 8, 20_000)}
    results = routing_dynamics(top1, 8)
    assert abs(results["moe/layer1/affinity_predictability"] - 1 / 8) < 0.02
    assert not any(name.endswith("routing_fluctuation") for name in results)


def test_layers_with_other_token_sets_are_left_out():
    results = routing_dynamics({0: np.zeros(8, int), 1: np.zeros(2, int)}, 2, {0: np.zeros(4, int)})
    assert results == {}


def test_routing_table_shows_dynamics_when_present():
    base = {
        "expert_load": np.array([0.5, 0.5]),
        "dropped_fraction": 0.0,
        "routing_entropy": 0.6,
        "load_max_over_mean": 1.0,
        "active_experts_per_token": 1.0,
        "token_sparsity": 0.5,
        "chunk_sparsity": 0.1,
    }
    results = {f"moe/layer{i}/{k}": v for i in (0, 1) for k, v in base.items()}
    results["moe/layer1/affinity_predictability"] = 0.75
    results["moe/layer0/routing_fluctuation"] = 0.125
    rows = routing_table(results).splitlines()
    assert "0.125" in rows[1] and "0.750" in rows[2] and rows[1].split()[-3] == "-"
