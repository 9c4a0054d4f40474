"""One-shot pruning from calibration statistics (magnitude, Wanda, SparseGPT) against float64
references written out separately: SparseGPT's without lazy batching, every update applied to
all later inputs at once, which the blocked version must equal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.pruning.one_shot import (
    LayerStatistics,
    accumulate,
    magnitude_mask,
    relative_layer_error,
    sparsegpt,
    wanda_mask,
)


def _layer(seed: int, d_in: int = 32, d_out: int = 12, tokens: int = 200):
    """A weight and correlated inputs (so the Hessian is far from diagonal)."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d_in, d_in)) / np.sqrt(d_in) + np.eye(d_in)
    x = rng.normal(size=(tokens, d_in)) @ mixing * rng.uniform(0.2, 3.0, size=d_in)
    return rng.normal(size=(d_in, d_out)), x


def _reference_sparsegpt(w, x, sparsity, nm, block, damp, fixed=None):
    """Frantar & Alistarh's algorithm in float64, one input at a time, no lazy batching;
    `fixed` (bool [d_in, d_out], True where kept) replaces the choice of what to prune."""
    weights = w.T.copy()  # [d_out, d_in]
    d_out, d_in = weights.shape
    h = x.T @ x
    h = h + damp * np.mean(np.diag(h)) * np.eye(d_in)
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor of H^-1
    pruned = np.zeros_like(weights, bool)
    for start in range(0, d_in, block):
        stop = min(start + block, d_in)
        if fixed is not None:
            pruned[:, start:stop] = ~fixed[start:stop].T
        elif nm is None:
            scores = weights[:, start:stop] ** 2 / np.diag(hinv)[start:stop] ** 2
            count = int(scores.size * sparsity)
            order = np.argsort(scores, axis=None, kind="stable")[:count]
            flat = np.zeros(scores.size, bool)
            flat[order] = True
            pruned[:, start:stop] = flat.reshape(scores.shape)
        for i in range(start, stop):
            if fixed is None and nm is not None and (i - start) % nm[1] == 0:
                n, m = nm
                scores = weights[:, i : i + m] ** 2 / np.diag(hinv)[i : i + m] ** 2
                drop = np.argsort(scores, axis=1, kind="stable")[:, : m - n]
                np.put_along_axis(pruned[:, i : i + m], drop, True, axis=1)
            kept = np.where(pruned[:, i], 0.0, weights[:, i])
            error = (weights[:, i] - kept) / hinv[i, i]
            weights[:, i:] -= np.outer(error, hinv[i, i:])
            weights[:, i] = kept
    return weights.T, ~pruned.T


@pytest.mark.parametrize(
    ("sparsity", "nm", "block"),
    [(0.5, None, 8), (0.7, None, 32), (0.5, (2, 4), 8), (0.5, (4, 8), 16)],
)
def test_sparsegpt_matches_the_unbatched_float64_reference(sparsity, nm, block):
    w, x = _layer(0)
    stats = accumulate(LayerStatistics.zeros(w.shape[0]), jnp.asarray(x[:120], jnp.float32))
    stats = accumulate(stats, jnp.asarray(x[120:], jnp.float32))
    with jax.enable_x64(True):
        ours, mask = sparsegpt(
            jnp.asarray(w), jnp.asarray(x.T @ x), sparsity, nm, block_size=block, damp=0.01
        )
        ours, mask = np.asarray(ours), np.asarray(mask)
    expected, expected_mask = _reference_sparsegpt(w, x, sparsity, nm, block, 0.01)
    np.testing.assert_array_equal(mask, expected_mask)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-8)
    assert np.all(ours[~mask] == 0)
    # The same from the float32 statistics accumulated over two batches.
    ours32, mask32 = sparsegpt(
        jnp.asarray(w, jnp.float32), stats.hessian, sparsity, nm, block_size=block
    )
    assert np.mean(np.asarray(mask32) == expected_mask) > 0.97
    np.testing.assert_allclose(stats.hessian, x.T @ x, rtol=1e-4, atol=1e-3)


def test_sparsegpt_with_a_given_mask_only_compensates_for_it():
    """`mask=` keeps the given weights and spreads the pruned ones' error as the reference
    does; given SparseGPT's own mask it returns its own result."""
    w, x = _layer(5)
    given = np.random.default_rng(5).random(w.shape) < 0.5
    with jax.enable_x64(True):
        ours, mask = sparsegpt(
            jnp.asarray(w), jnp.asarray(x.T @ x), 0.5, block_size=8, mask=jnp.asarray(given)
        )
        again, _ = sparsegpt(jnp.asarray(w), jnp.asarray(x.T @ x), 0.7, (2, 4), block_size=8)
        _, own_mask = sparsegpt(jnp.asarray(w), jnp.asarray(x.T @ x), 0.7, (2, 4), block_size=8)
        replayed, _ = sparsegpt(
            jnp.asarray(w), jnp.asarray(x.T @ x), 0.0, block_size=8, mask=own_mask
        )
    expected, _ = _reference_sparsegpt(w, x, 0.5, None, 8, 0.01, fixed=given)
    np.testing.assert_array_equal(np.asarray(mask), given)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(np.asarray(replayed), np.asarray(again), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="mask.shape"):
        sparsegpt(jnp.asarray(w), jnp.asarray(x.T @ x), 0.5, mask=jnp.ones((4, 4), bool))


def test_sparsegpt_reconstructs_the_layer_better_than_its_mask_alone():
    """The compensating updates lower ||X W - X W'|| below zeroing the same weights."""
    w, x = _layer(1)
    pruned, mask = sparsegpt(jnp.asarray(w, jnp.float32), jnp.asarray(x.T @ x, jnp.float32), 0.5)
    error = np.linalg.norm(x @ w - x @ np.asarray(pruned, np.float64))
    zeroed = np.linalg.norm(x @ w - x @ (w * np.asarray(mask)))
    wanda = np.linalg.norm(x @ w - x @ (w * np.asarray(wanda_mask(w, (x**2).sum(0), 0.5))))
    assert error < 0.95 * zeroed and error < wanda


def test_relative_layer_error_is_the_output_error_over_the_output_energy():
    w, x = _layer(6)
    w_new = w * (np.abs(w) > 0.5)
    expected = np.sum((x @ w - x @ w_new) ** 2) / np.sum((x @ w) ** 2)
    ours = relative_layer_error(jnp.asarray(w), jnp.asarray(w_new), jnp.asarray(x.T @ x))
    np.testing.assert_allclose(float(ours), expected, rtol=1e-4)
    assert float(relative_layer_error(jnp.asarray(w), jnp.asarray(w), jnp.zeros((32, 32)))) == 0


def test_wanda_keeps_each_outputs_highest_weight_times_input_norm():
    w, x = _layer(2)
    norms = np.sqrt((x**2).sum(0))
    mask = np.asarray(wanda_mask(jnp.asarray(w), jnp.asarray((x**2).sum(0)), 0.5))
    scores = np.abs(w) * norms[:, None]
    for out in range(w.shape[1]):
        kept = set(np.argsort(-scores[:, out])[: w.shape[0] // 2])
        assert set(np.flatnonzero(mask[:, out])) == kept
    two_four = np.asarray(wanda_mask(jnp.asarray(w), jnp.asarray((x**2).sum(0)), 0.5, (2, 4)))
    assert np.all(two_four.reshape(-1, 4, w.shape[1]).sum(1) == 2)


def test_magnitude_mask_keeps_the_largest_weights_of_the_layer():
    w, _ = _layer(3)
    mask = np.asarray(magnitude_mask(jnp.asarray(w), 0.75))
    threshold = np.sort(np.abs(w), axis=None)[int(0.75 * w.size)]
    assert mask.sum() == w.size - int(0.75 * w.size)
    assert np.all(np.abs(w)[mask] >= threshold)


def test_token_weights_count_only_the_selected_tokens():
    """What an expert's statistics see: the tokens routed to it, no others."""
    _, x = _layer(4)
    routed = np.random.default_rng(0).random(x.shape[0]) < 0.3
    stats = accumulate(
        LayerStatistics.zeros(x.shape[1]), jnp.asarray(x, jnp.float32), jnp.asarray(routed)
    )
    mine = x[routed]
    np.testing.assert_allclose(stats.hessian, mine.T @ mine, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(stats.sq_norms, (mine**2).sum(0), rtol=1e-5)
    assert float(stats.tokens) == routed.sum()


def test_bad_arguments_name_the_argument():
    w = jnp.ones((8, 4))
    with pytest.raises(ValueError, match="sparsity"):
        magnitude_mask(w, 1.0)
    with pytest.raises(ValueError, match="nm"):
        wanda_mask(w, jnp.ones(8), 0.5, (2, 3))
    with pytest.raises(ValueError, match="hessian.shape"):
        sparsegpt(w, jnp.eye(4), 0.5)
