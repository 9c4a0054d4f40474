"""Scores against brute-force references; ERK densities against their definition."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.pruning import scores

SHAPES = [(784, 300), (300, 100), (100, 10), (3, 3, 16, 32)]


def test_erk_densities_keep_the_target_count_and_the_erk_proportions():
    density = 0.2
    got = np.asarray(scores.erk_densities(SHAPES, density), np.float64)
    sizes = np.array([math.prod(s) for s in SHAPES], np.float64)
    assert np.isclose((got * sizes).sum(), density * sizes.sum(), rtol=1e-5)
    raw = np.array([sum(s) / math.prod(s) for s in SHAPES])
    sparse = got < 1.0
    # Layers below 1 share one scale factor eps: density_l / raw_l is constant.
    ratios = got[sparse] / raw[sparse]
    assert np.allclose(ratios, ratios[0], rtol=1e-5)
    # The small output layer saturates at 1 (its ERK density would exceed 1).
    assert got[2] == 1.0
    assert np.all(got <= 1.0)


def test_erk_densities_work_with_a_traced_density():
    got = jax.jit(lambda d: scores.erk_densities(SHAPES, d))(jnp.float32(0.2))
    assert np.allclose(np.asarray(got), np.asarray(scores.erk_densities(SHAPES, 0.2)))


def test_erk_densities_reject_a_density_outside_0_1():
    with pytest.raises(ValueError, match=r"density: got .*; allowed: in \(0, 1\]"):
        scores.erk_densities(SHAPES, 1.5)


def test_wanda_scores_match_a_loop_over_weights():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 4))
    x = rng.normal(size=(9, 6))
    got = np.asarray(scores.wanda_scores(jnp.asarray(w), jnp.asarray(x)))
    want = np.zeros_like(w)
    for i in range(6):
        for j in range(4):
            want[i, j] = abs(w[i, j]) * math.sqrt(sum(x[t, i] ** 2 for t in range(9)))
    assert np.allclose(got, want, rtol=1e-5)


def test_snip_scores_are_the_connection_sensitivity_of_the_loss():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(5, 3))
    x = rng.normal(size=(7, 5))

    def loss(params):
        return jnp.sum(jnp.tanh(jnp.asarray(x, jnp.float32) @ params["w"]) ** 2)

    got = np.asarray(scores.snip_scores_from_loss(loss, {"w": jnp.asarray(w, jnp.float32)})["w"])
    # Finite differences in float64 give the gradient independently of jax.grad.
    f = lambda v: np.sum(np.tanh(x @ v) ** 2)
    grad = np.zeros_like(w)
    for i in range(5):
        for j in range(3):
            step = np.zeros_like(w)
            step[i, j] = 1e-6
            grad[i, j] = (f(w + step) - f(w - step)) / 2e-6
    assert np.allclose(got, np.abs(grad * w), rtol=1e-3, atol=1e-5)


def test_magnitude_pruning_removes_the_smallest_weights():
    from moejax.pruning.patterns import unstructured_mask

    w = np.random.default_rng(2).normal(size=(10, 10))
    mask = np.asarray(unstructured_mask(scores.magnitude_scores(jnp.asarray(w)), 0.7))
    assert np.abs(w[mask]).min() >= np.abs(w[~mask]).max()
    assert (~mask).sum() == 70
