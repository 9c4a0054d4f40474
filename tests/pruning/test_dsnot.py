"""DSnoT lowers the reconstruction error of a sparse layer and keeps its sparsity."""

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.pruning import dsnot
from moejax.pruning.patterns import unstructured_mask
from moejax.pruning.scores import wanda_scores


def _layer(seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(64, 32))
    # LLM-like inputs: per-feature means and scales differ.
    x = rng.normal(size=(512, 64)) * rng.uniform(0.2, 2.0, 64) + rng.normal(size=64)
    return jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32), w, x


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_dsnot_lowers_the_reconstruction_error_and_keeps_the_sparsity(sparsity):
    w, x, w64, x64 = _layer()
    start = unstructured_mask(wanda_scores(w, x), sparsity, per_slice_axis=1)
    result = dsnot.dsnot(w, start, x, max_cycles=40)
    start_np, mask = np.asarray(start), np.asarray(result.mask)
    assert np.array_equal(mask.sum(axis=0), start_np.sum(axis=0))
    assert int(np.asarray(result.swaps).sum()) > 0

    def expected_abs_error(m):  # float64 reference of the paper's criterion
        return np.abs(x64.mean(axis=0) @ np.where(m, 0.0, w64))

    before, after = expected_abs_error(start_np), expected_abs_error(mask)
    assert np.all(after <= before + 1e-9) and after.sum() < 0.5 * before.sum()
    assert np.allclose(np.asarray(result.error_after), after, rtol=1e-4, atol=1e-4)

    def squared_error(m):
        return np.sum((x64 @ w64 - x64 @ np.where(m, w64, 0.0)) ** 2)

    assert squared_error(mask) < squared_error(start_np)


def test_dsnot_leaves_a_mask_with_zero_error_unchanged():
    w, x, _, _ = _layer(1)
    dense = jnp.ones(w.shape, bool)
    result = dsnot.dsnot(w, dense, x)
    assert np.array_equal(np.asarray(result.mask), np.asarray(dense))
    assert int(np.asarray(result.swaps).sum()) == 0


def test_dsnot_rejects_mismatched_shapes():
    w, x, _, _ = _layer()
    with pytest.raises(ValueError, match="x: \\[tokens, d_in\\]"):
        dsnot.dsnot(w, jnp.ones(w.shape, bool), x[:, :10])
