"""Block-pattern builders against brute-force element masks."""

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_pallas.block_sparse_attention import mask_info
from moejax.sparse_attention import masks

LENGTH = 96
BLOCKS = st.sampled_from([(8, 8), (8, 16), (16, 8), (32, 32), (16, 32)])


def _positions(length):
    return np.arange(length)[:, None], np.arange(length)[None, :]


def _tight(pattern: masks.BlockPattern) -> bool:
    """Every visited block holds at least one visible element (no wasted block visits)."""
    element = pattern.element_mask()
    nq, nk = pattern.block_mask.shape
    per_block = element.reshape(nq, pattern.block_q, nk, pattern.block_kv).any(axis=(1, 3))
    return bool(np.array_equal(per_block, pattern.block_mask))


@settings(max_examples=15, deadline=None)
@given(blocks=BLOCKS)
def test_causal_matches_lower_triangle(blocks):
    pattern = masks.causal(LENGTH, *blocks)
    q, k = _positions(LENGTH)
    np.testing.assert_array_equal(pattern.element_mask(), k <= q)
    assert _tight(pattern)
    assert pattern.density() == 1.0


@settings(max_examples=20, deadline=None)
@given(blocks=BLOCKS, window=st.integers(1, 70))
def test_sliding_window_matches_brute_force(blocks, window):
    q, k = _positions(LENGTH)
    brute = (k <= q) & (k > q - window)
    exact = masks.sliding_window(LENGTH, *blocks, window)
    np.testing.assert_array_equal(exact.element_mask(), brute)
    assert _tight(exact)
    coarse = masks.sliding_window(LENGTH, *blocks, window, exact=False)
    np.testing.assert_array_equal(coarse.block_mask, exact.block_mask)
    assert not np.any(brute & ~coarse.element_mask())  # block-granular window covers the exact


@settings(max_examples=20, deadline=None)
@given(blocks=BLOCKS, num_global=st.integers(0, 40), window=st.integers(1, 50))
def test_global_local_covers_brute_force_and_is_tight(blocks, num_global, window):
    q, k = _positions(LENGTH)
    glob = masks.global_tokens(LENGTH, *blocks, num_global)
    brute_global = (k <= q) & ((k < num_global) | (q < num_global))
    assert not np.any(brute_global & ~glob.element_mask())
    if num_global % max(blocks) == 0:  # block-aligned global tokens are exact
        np.testing.assert_array_equal(glob.element_mask(), brute_global)
    assert _tight(glob)
    both = masks.global_local(LENGTH, *blocks, window, num_global)
    brute = brute_global | ((k <= q) & (k > q - window))
    assert not np.any(brute & ~both.element_mask())
    assert _tight(both)


def test_intersection_applies_both_element_flags():
    window = masks.sliding_window(LENGTH, 16, 16, 20)
    glob = masks.global_tokens(LENGTH, 16, 16, 5)
    both = window & glob
    np.testing.assert_array_equal(both.element_mask(), window.element_mask() & glob.element_mask())


def test_union_of_different_element_flags_is_rejected():
    with pytest.raises(ValueError, match="element flags"):
        masks.sliding_window(LENGTH, 16, 16, 20) | masks.global_tokens(LENGTH, 16, 16, 4)


@settings(max_examples=10, deadline=None)
@given(dilation=st.integers(1, 4), num_blocks=st.integers(1, 5))
def test_dilated_visits_strided_earlier_blocks(dilation, num_blocks):
    block = 8
    pattern = masks.dilated(LENGTH, block, dilation, num_blocks)
    q, k = _positions(LENGTH)
    offset = q // block - k // block
    brute = (k <= q) & (offset % dilation == 0) & (offset < dilation * num_blocks)
    np.testing.assert_array_equal(pattern.element_mask(), brute)
    assert pattern.max_kv_blocks <= num_blocks


def test_random_blocks_are_strictly_earlier_and_counted():
    pattern = masks.random_blocks(LENGTH, 8, 3, seed=0)
    nq = LENGTH // 8
    assert not np.any(np.triu(pattern.block_mask))  # only strictly earlier blocks
    np.testing.assert_array_equal(pattern.block_mask.sum(1), np.minimum(np.arange(nq), 3))
    again = masks.random_blocks(LENGTH, 8, 3, seed=0)
    np.testing.assert_array_equal(pattern.block_mask, again.block_mask)


def test_long_sequences_build_without_quadratic_memory():
    pattern = masks.global_local(1 << 20, 512, 512, 4096, 64)  # 2048 x 2048 blocks
    assert pattern.block_mask.shape == (2048, 2048)
    assert pattern.max_kv_blocks == 1 + 9  # global block 0, own block and 8 earlier ones


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: masks.causal(100, 16, 16), "not divisible by block_q=16"),
        (lambda: masks.sliding_window(96, 16, 16, 0), "window=0"),
        (lambda: masks.global_tokens(96, 16, 16, -1), "num_global=-1"),
        (lambda: masks.dilated(96, 16, 0, 2), "dilation=0"),
        (lambda: masks.causal(96, 16, 16) & masks.causal(96, 8, 8), "shape, block_q"),
    ],
)
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), max_visits=st.integers(1, 7))
def test_host_visit_lists_equal_traced_ones(seed, max_visits):
    """A concrete mask is listed in numpy (no compile-time constant folding of a sort); the
    lists must be those the traced path computes."""
    mask = np.random.default_rng(seed).random((2, 1, 5, 6)) < 0.4
    host = mask_info.visit_lists(mask, max_visits)
    traced = jax.jit(lambda m: mask_info.visit_lists(m, max_visits))(mask)
    np.testing.assert_array_equal(np.asarray(host.indices), np.asarray(traced.indices))
    np.testing.assert_array_equal(np.asarray(host.counts), np.asarray(traced.counts))
    rows = mask.reshape(-1, 6)
    all_indices = np.asarray(host.indices).reshape(len(rows), -1)
    for row, indices, count in zip(rows, all_indices, np.asarray(host.counts).ravel(), strict=True):
        true_cols = np.flatnonzero(row)
        assert count == min(len(true_cols), max_visits)
        np.testing.assert_array_equal(indices[:count], true_cols[:count])
