"""BiFormer region selection against a brute-force loop over query regions and kv regions."""

import jax
import numpy as np
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from moejax.sparse_attention.bilevel import bilevel_select

# One compilation per drawn shape instead of one per eager op.
_select = jax.jit(bilevel_select, static_argnames=("block", "top_k"))


def _reference(q: np.ndarray, k: np.ndarray, block: int, top_k: int):
    """(block_mask [b, regions, regions], picked sets [b][regions], k-th score gaps) in float64:
    each query region keeps the `top_k` earlier regions of highest summed-over-heads affinity
    between mean-pooled queries and keys, plus itself."""
    batch, length, heads, _ = q.shape
    group = heads // k.shape[2]
    regions = length // block
    mask = np.zeros((batch, regions, regions), bool)
    picked, gaps = [], []
    for b in range(batch):
        picked.append([])
        for i in range(regions):
            q_pool = q[b, i * block : (i + 1) * block].mean(axis=0)  # [heads, d]
            scores = []
            for j in range(i):
                k_pool = k[b, j * block : (j + 1) * block].mean(axis=0)  # [kv_heads, d]
                scores.append(sum(q_pool[h] @ k_pool[h // group] for h in range(heads)))
            order = sorted(range(i), key=lambda j: -scores[j])
            best = set(order[:top_k])
            if len(order) > top_k:
                gaps.append(scores[order[top_k - 1]] - scores[order[top_k]])
            picked[-1].append(best)
            mask[b, i, sorted(best | {i})] = True
    return mask, picked, gaps


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 2),
    regions=st.integers(1, 6),
    block=st.integers(1, 4),
    kv_heads=st.integers(1, 2),
    group=st.integers(1, 2),
    head_dim=st.integers(1, 4),
    top_k=st.integers(1, 7),
    seed=st.integers(0, 2**31 - 1),
)
@example(batch=2, regions=8, block=8, kv_heads=2, group=2, head_dim=8, top_k=2, seed=0)
def test_bilevel_select_keeps_the_top_k_most_affine_earlier_regions(
    batch, regions, block, kv_heads, group, head_dim, top_k, seed
):
    heads = kv_heads * group
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, regions * block, heads, head_dim), np.float32)
    k = rng.standard_normal((batch, regions * block, kv_heads, head_dim), np.float32)
    mask, picked, gaps = _reference(q.astype(np.float64), k.astype(np.float64), block, top_k)
    # float32 pooling may swap two regions whose affinities (nearly) tie; those draws say nothing.
    assume(all(gap > 1e-4 for gap in gaps))
    selection = _select(q, k, block=block, top_k=top_k)
    np.testing.assert_array_equal(np.asarray(selection.block_mask)[:, 0], mask)
    selected = np.asarray(selection.selected)[:, 0]  # [batch, regions, min(top_k, regions)]
    assert selected.shape == (batch, regions, min(top_k, regions))
    for b in range(batch):
        for i in range(regions):
            got = [int(j) for j in selected[b, i] if j >= 0]
            assert len(got) == len(set(got)) and set(got) == picked[b][i]
