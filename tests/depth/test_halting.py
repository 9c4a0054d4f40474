"""Relative-norm halting (`moejax.depth.halting`): skip small MoE updates per token."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from depth_toy_block import D_MODEL, depth_inputs

from moejax import depth


def test_relative_norm_halting_matches_numpy() -> None:
    key_x, key_u, key_s = jax.random.split(jax.random.key(18), 3)
    x = jax.random.normal(key_x, (2, 16, D_MODEL))
    # Per-token scales spread the relative norms around the threshold.
    scale = jax.random.uniform(key_s, (2, 16, 1), minval=0.0, maxval=0.6)
    update = jax.random.normal(key_u, (2, 16, D_MODEL)) * scale
    threshold = 0.25
    y, aux = depth.relative_norm_halting(x, update, threshold=threshold)

    xn, un = np.asarray(x, np.float64), np.asarray(update, np.float64)
    rel = np.linalg.norm(un, axis=-1) / np.linalg.norm(xn, axis=-1)
    halted = rel < threshold
    assert 0 < halted.sum() < halted.size
    np.testing.assert_allclose(aux["relative_norm"], rel, rtol=1e-5)
    np.testing.assert_allclose(aux["mean_relative_norm"], rel.mean(), rtol=1e-5)
    np.testing.assert_allclose(aux["halted_fraction"], halted.mean())
    np.testing.assert_array_equal(np.asarray(y)[halted], np.asarray(x)[halted])
    np.testing.assert_allclose(np.asarray(y)[~halted], (xn + un)[~halted], rtol=1e-6)


def test_halting_mask_from_previous_matches_numpy_and_is_sticky() -> None:
    prev = jnp.asarray([[0.05, 0.3, 0.1, 0.5]])
    before = jnp.asarray([[False, False, False, True]])
    np.testing.assert_array_equal(
        depth.halting_mask_from_previous(prev, 0.2), np.asarray(prev) < 0.2
    )
    np.testing.assert_array_equal(
        depth.halting_mask_from_previous(prev, 0.2, previously_halted=before),
        [[True, False, True, True]],
    )


def test_apply_halting_feeds_the_next_layer_decision() -> None:
    x, _ = depth_inputs(1, 6, seed=19)
    update = 0.1 * x
    halted = jnp.asarray([[True, False, True, False, False, False]])
    y, aux = depth.apply_halting(x, update, halted)
    np.testing.assert_array_equal(y[halted], x[halted])
    np.testing.assert_allclose(aux["relative_norm"], np.where(halted, 0.0, 0.1), rtol=1e-5)
    np.testing.assert_allclose(aux["halted_fraction"], 2 / 6)


def test_moe_flops_saved_fraction_matches_numpy() -> None:
    halted = np.asarray([0.1, 0.4, 0.25])
    flops = np.asarray([1.0, 2.0, 1.0])
    np.testing.assert_allclose(depth.moe_flops_saved_fraction(halted), halted.mean(), rtol=1e-6)
    np.testing.assert_allclose(
        depth.moe_flops_saved_fraction(halted, flops),
        (halted * flops).sum() / flops.sum(),
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="flops_per_layer"):
        depth.moe_flops_saved_fraction(halted, flops[:2])


def test_halting_rejects_bad_threshold() -> None:
    x, _ = depth_inputs(1, 2)
    for threshold in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="threshold"):
            depth.relative_norm_halting(x, x, threshold=threshold)
        with pytest.raises(ValueError, match="threshold"):
            depth.halting_mask_from_previous(jnp.zeros((1, 2)), threshold)
