"""DSnoT lowers the reconstruction error of a sparse layer and keeps its sparsity: one
matrix, the experts of a MoE layer, and the registered "dsnot" method."""

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.pruning import dsnot
from moejax.pruning.dsnot import dsnot_experts
from moejax.pruning.one_shot import LayerStatistics, accumulate
from moejax.pruning.patterns import nm_mask, unstructured_mask
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
    with pytest.raises(
        ValueError,
        match=r"w, mask, x shapes: got .*; allowed: .* x: \[tokens, d_in\]",
    ):
        dsnot.dsnot(w, jnp.ones(w.shape, bool), x[:, :10])


def _group_swaps_reference(w, mask, x, m, cycles):
    """The N:M-preserving swap of `dsnot(group_size=m)` written as loops in float64: per output
    and cycle, among the pruned weights that move ε towards 0 and have a kept partner in their
    group that leaves |ε| lower, grow the best-gain one, prune its lowest-Wanda partner."""
    mean, var, norm = x.mean(0), x.var(0), np.linalg.norm(x, axis=0)
    mask = mask.copy()
    for r in range(w.shape[1]):
        c = w[:, r] * mean
        for _ in range(cycles):
            error = np.sum(np.where(mask[:, r], 0.0, c))
            best = None
            for p in np.flatnonzero(~mask[:, r] & (np.sign(c) == np.sign(error))):
                group = range(p - p % m, p - p % m + m)
                grown = error - c[p]
                partners = [
                    q
                    for q in group
                    if mask[q, r]
                    and np.sign(c[q]) == -np.sign(grown)
                    and abs(grown + c[q]) < abs(error)
                ]
                if partners:
                    gain = abs(c[p]) / (var[p] + 1e-12)
                    q = min(partners, key=lambda q: abs(w[q, r]) * norm[q])
                    if best is None or gain > best[0]:
                        best = (gain, p, q)
            if best is not None:
                mask[best[1], r], mask[best[2], r] = True, False
    return mask


def test_dsnot_in_groups_keeps_n_m_and_matches_the_loop_reference():
    w, x, w64, x64 = _layer(2)
    start = np.asarray(nm_mask(jnp.abs(w) * jnp.linalg.norm(x, axis=0)[:, None], 2, 4, 0))
    result = dsnot.dsnot(w, jnp.asarray(start), x, max_cycles=6, group_size=4)
    mask = np.asarray(result.mask)
    assert np.all(mask.reshape(16, 4, 32).sum(axis=1) == 2)
    assert int(np.asarray(result.swaps).sum()) > 0
    np.testing.assert_array_equal(mask, _group_swaps_reference(w64, start, x64, 4, 6))
    assert np.all(np.asarray(result.error_after) <= np.asarray(result.error_before) + 1e-5)
    # Unconstrained swaps break the groups: the constraint is what keeps 2:4.
    free = np.asarray(dsnot.dsnot(w, jnp.asarray(start), x, max_cycles=6).mask)
    assert np.any(free.reshape(16, 4, 32).sum(axis=1) != 2)


def test_dsnot_from_moments_equals_dsnot_on_the_tokens():
    """Running statistics (`LayerStatistics`) give the same refinement as the tokens."""
    w, x, _, _ = _layer(3)
    start = unstructured_mask(wanda_scores(w, x), 0.5, per_slice_axis=1)
    stats = accumulate(LayerStatistics.zeros(64), x[:200])
    stats = accumulate(stats, x[200:])
    mean, variance = stats.mean_and_variance()
    np.testing.assert_allclose(mean, np.asarray(x).mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(variance, np.asarray(x).var(0), rtol=1e-4, atol=1e-4)
    from_stats = dsnot.dsnot_from_moments(
        w, start, mean, variance, jnp.sqrt(stats.sq_norms), max_cycles=20
    )
    from_tokens = dsnot.dsnot(w, start, x, max_cycles=20)
    np.testing.assert_array_equal(from_stats.mask, from_tokens.mask)
    with pytest.raises(ValueError, match="group_size: got 5"):
        dsnot.dsnot(w, start, x, group_size=5)


def _expected_error(w, mask, x):
    """Σ over columns of |E[x] @ ((1 - M) ⊙ W)| in float64."""
    pruned = np.where(mask, 0.0, np.asarray(w, np.float64))
    return float(np.abs(np.asarray(x, np.float64).mean(axis=0) @ pruned).sum())


def test_dsnot_experts_keeps_column_counts_and_lowers_the_expected_error():
    rng = np.random.default_rng(3)
    experts, d, f = 3, 16, 8
    weights = {
        "w_gate": rng.normal(size=(experts, d, f)),
        "w_up": rng.normal(size=(experts, d, f)),
        "w_down": rng.normal(size=(experts, f, d)),
    }
    masks = {name: rng.random(w.shape) < 0.5 for name, w in weights.items()}
    x = rng.normal(size=(64, d)) + rng.normal(size=d)  # a mean per feature, as in a real layer
    expert_index = np.stack([np.arange(64) % 2, (np.arange(64) + 1) % 2], axis=1)
    expert_index[0, 1] = 2  # expert 2 sees one token: too few to refine with
    new, report = dsnot_experts(weights, masks, x, expert_index, max_cycles=20)

    before = after = 0.0
    for expert in range(2):
        routed = x[np.any(expert_index == expert, axis=1)]
        for name in ("w_gate", "w_up"):
            before += _expected_error(weights[name][expert], masks[name][expert], routed)
            after += _expected_error(weights[name][expert], new[name][expert], routed)
        gate = routed @ np.where(new["w_gate"][expert], weights["w_gate"][expert], 0.0)
        up = routed @ np.where(new["w_up"][expert], weights["w_up"][expert], 0.0)
        hidden = gate / (1 + np.exp(-gate)) * up
        before += _expected_error(weights["w_down"][expert], masks["w_down"][expert], hidden)
        after += _expected_error(weights["w_down"][expert], new["w_down"][expert], hidden)
        full = dsnot.dsnot(
            weights["w_gate"][expert], masks["w_gate"][expert], routed, max_cycles=20
        )  # on every token rather than on the two moment rows
        np.testing.assert_array_equal(new["w_gate"][expert], np.asarray(full.mask))
    np.testing.assert_allclose(report["error_before"], before, rtol=1e-4)
    np.testing.assert_allclose(report["error_after"], after, rtol=1e-4)
    assert report["error_after"] < 0.5 * report["error_before"] and report["swaps"] > 0
    for name in weights:
        np.testing.assert_array_equal(new[name].sum(axis=1), masks[name].sum(axis=1))
        np.testing.assert_array_equal(new[name][2], masks[name][2])


def test_the_registered_method_refines_each_prunable_leaf_with_its_calibration_inputs():
    from moejax.pruning import get_method

    rng = np.random.default_rng(5)
    params = {
        "a": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
        "c": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
    }
    masks = {name: jnp.asarray(rng.random((16, 8)) < 0.5) for name in params}
    x = jnp.asarray(rng.normal(size=(64, 16)) + rng.normal(size=16), jnp.float32)
    spec = get_method("dsnot")
    options = spec.options(max_cycles=20)
    refined = spec.refine(
        params,
        masks,
        prunable={"a": True, "b": True, "c": False},
        options=options,
        calibration={"a": x, "c": x},
    )
    np.testing.assert_array_equal(
        refined["a"], dsnot.dsnot(params["a"], masks["a"], x, max_cycles=20).mask
    )
    assert not np.array_equal(refined["a"], masks["a"])
    np.testing.assert_array_equal(refined["b"], masks["b"])  # no calibration inputs
    np.testing.assert_array_equal(refined["c"], masks["c"])  # not prunable
