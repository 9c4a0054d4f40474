"""Each sparsity pattern's defining property, against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.pruning import patterns


def _scores(shape, seed=0):
    # numpy draws: a jax.random call per new shape would compile again.
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@settings(max_examples=6, deadline=None)
@given(
    nm=st.sampled_from([(2, 4), (4, 8), (1, 8), (1, 4)]),
    groups=st.integers(1, 3),
    other=st.integers(1, 5),
    axis=st.sampled_from([0, 1, -1]),
    seed=st.integers(0, 100),
)
def test_nm_mask_keeps_exactly_n_of_each_m_group_along_axis(nm, groups, other, axis, seed):
    n, m = nm
    shape = [other, other + 1]
    shape[axis] = groups * m
    scores = np.asarray(_scores(tuple(shape), seed))
    mask = np.asarray(patterns.nm_mask(jnp.asarray(scores), n, m, axis))
    grouped = np.moveaxis(mask, axis, -1).reshape(-1, m)
    assert (grouped.sum(axis=1) == n).all()
    # The kept entries are the n largest of their group.
    scored = np.moveaxis(scores, axis, -1).reshape(-1, m)
    for row_mask, row in zip(grouped, scored, strict=True):
        assert set(np.flatnonzero(row_mask)) == set(np.argsort(-row)[:n])


def test_nm_mask_rejects_sizes_not_divisible_by_m():
    with pytest.raises(ValueError, match="axis 0 size: got 6; allowed: a multiple of m=4"):
        patterns.nm_mask(jnp.ones((6, 3)), 2, 4, axis=0)


@settings(max_examples=6, deadline=None)
@given(size=st.integers(1, 60), sparsity=st.floats(0.0, 1.0), seed=st.integers(0, 50))
def test_unstructured_mask_prunes_exactly_round_sparsity_times_size_lowest(size, sparsity, seed):
    scores = np.asarray(_scores((size,), seed))
    mask = np.asarray(patterns.unstructured_mask(jnp.asarray(scores), sparsity))
    pruned = round(sparsity * size)
    assert (~mask).sum() == pruned
    assert set(np.flatnonzero(~mask)) == set(np.argsort(scores)[:pruned])


def test_unstructured_mask_is_exact_for_ties_and_a_traced_sparsity():
    mask = jax.jit(patterns.unstructured_mask)(jnp.zeros((7, 9)), jnp.float32(0.5))
    assert int((~mask).sum()) == round(0.5 * 63)


def test_per_slice_sparsity_is_the_same_in_every_slice():
    scores = _scores((12, 5))
    mask = np.asarray(patterns.unstructured_mask(scores, 0.25, per_slice_axis=1))
    assert ((~mask).sum(axis=0) == 3).all()


def test_masked_scores_never_revive_pruned_entries():
    scores = _scores((40,))
    first = patterns.unstructured_mask(scores, 0.3)
    second = patterns.unstructured_mask(patterns.masked_scores(-scores, first), 0.5)
    assert not np.any(np.asarray(second) & ~np.asarray(first))
    assert int((~second).sum()) == 20


def test_block_mask_prunes_whole_tiles_with_the_lowest_sums():
    scores = np.asarray(jnp.abs(_scores((2, 8, 12))))
    mask = np.asarray(patterns.block_mask(jnp.asarray(scores), 0.5, (4, 3)))
    tiles = mask.reshape(2, 2, 4, 4, 3).transpose(0, 1, 3, 2, 4).reshape(-1, 12)
    assert np.all(tiles.all(axis=1) | ~tiles.any(axis=1))
    kept = tiles.all(axis=1)
    assert kept.sum() == 16 - 8
    sums = scores.reshape(2, 2, 4, 4, 3).transpose(0, 1, 3, 2, 4).reshape(-1, 12).sum(axis=1)
    assert sums[kept].min() >= sums[~kept].max()


@pytest.mark.parametrize("axis", [0, -1, 2])
def test_slice_mask_prunes_whole_neurons_channels_or_experts(axis):
    scores = np.asarray(jnp.abs(_scores((4, 3, 10))))
    mask = np.asarray(patterns.slice_mask(jnp.asarray(scores), 0.5, axis))
    moved = np.moveaxis(mask, axis, 0).reshape(mask.shape[axis], -1)
    assert np.all(moved.all(axis=1) | ~moved.any(axis=1))
    kept = moved.all(axis=1)
    assert (~kept).sum() == round(0.5 * mask.shape[axis])
    sums = np.moveaxis(scores, axis, 0).reshape(mask.shape[axis], -1).sum(axis=1)
    assert sums[kept].min() >= sums[~kept].max()


def test_expert_masks_remove_the_same_experts_from_every_expert_weight():
    params = {
        "w_gate": _scores((8, 4, 6), 1),
        "w_up": _scores((8, 4, 6), 2),
        "w_down": _scores((8, 6, 4), 3),
    }
    params["w_up"] = params["w_up"].at[5].multiply(100.0)  # expert 5 must survive
    masks = patterns.expert_masks(params, 0.25)
    kept = {name: np.asarray(m).reshape(8, -1) for name, m in masks.items()}
    per_expert = kept["w_gate"].all(axis=1)
    for m in kept.values():
        assert np.array_equal(m.all(axis=1), per_expert)
        assert np.all(m.all(axis=1) | ~m.any(axis=1))
    assert per_expert.sum() == 6 and per_expert[5]
    frequency = jnp.arange(8.0)
    by_routing = patterns.expert_masks(params, 0.5, frequency)
    assert np.array_equal(np.asarray(by_routing["w_down"][:, 0, 0]), np.arange(8) >= 4)


def test_global_masks_match_a_single_sorted_threshold():
    scores = [_scores((5, 7), 1), _scores((11,), 2), _scores((3, 2, 2), 3)]
    masks = patterns.global_unstructured_masks(scores, 0.4)
    flat = np.concatenate([np.asarray(s).ravel() for s in scores])
    kept = np.concatenate([np.asarray(m).ravel() for m in masks])
    pruned = round(0.4 * flat.size)
    assert set(np.flatnonzero(~kept)) == set(np.argsort(flat)[:pruned])


def test_layer_masks_remove_whole_tensors_with_the_lowest_mean():
    scores = [jnp.full((3, 3), 1.0), jnp.full((4,), 5.0), jnp.full((2, 2), 0.5), jnp.ones(2) * 3]
    masks = patterns.layer_masks(scores, 0.5)
    assert [bool(m.all()) for m in masks] == [False, True, False, True]
    assert not any(bool(m.any()) and not bool(m.all()) for m in masks)
