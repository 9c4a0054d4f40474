"""Routing functions against brute-force numpy selections."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.sparse_attention.bilevel import bilevel_select
from moejax.sparse_attention.dynamic_mask import append_key_bias, dynamic_mask_select
from moejax.sparse_attention.moba import causal_key_conv, moba_select
from moejax.sparse_attention.routing import (
    cluster_select,
    normalise,
    shared_keys,
    shift_to_previous,
    update_centroids,
)
from moejax.sparse_attention.selection import causal_density

B, T, H, KVH, D = 2, 64, 4, 2, 8


def _qkv(seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (B, T, H, D))
    k = jax.random.normal(keys[1], (B, T, KVH, D))
    v = jax.random.normal(keys[2], (B, T, KVH, D))
    return q, k, v


@pytest.mark.parametrize(("block_q", "block_kv", "top_k"), [(8, 8, 2), (4, 16, 1), (8, 16, 3)])
def test_moba_selects_top_k_past_blocks_by_pooled_score(block_q, block_kv, top_k):
    q, k, _ = _qkv()
    selection = moba_select(q, k, block_q=block_q, block_kv=block_kv, top_k=top_k)
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    nq, nk = T // block_q, T // block_kv
    q_pool = qn.reshape(B, nq, block_q, H, D).mean(2)
    k_pool = np.repeat(kn.reshape(B, nk, block_kv, KVH, D).mean(2), H // KVH, axis=2)
    for b in range(B):
        for h in range(H):
            for i in range(nq):
                own = i * block_q // block_kv
                scores = k_pool[b, :own, h] @ q_pool[b, i, h]
                best = set(np.argsort(-scores)[:top_k].tolist())
                expected = np.zeros(nk, bool)
                expected[list(best | {own})] = True
                np.testing.assert_array_equal(np.asarray(selection.block_mask[b, h, i]), expected)
                picked = {int(j) for j in np.asarray(selection.selected[b, h, i]) if j >= 0}
                assert picked == best


def test_moba_with_every_block_visits_the_whole_causal_triangle():
    q, k, _ = _qkv()
    selection = moba_select(q, k, block_q=8, block_kv=8, top_k=T // 8)
    np.testing.assert_array_equal(
        np.asarray(selection.block_mask[0, 0]), np.tril(np.ones((T // 8, T // 8), bool))
    )
    assert float(causal_density(selection.block_mask, 8, 8)) == 1.0


def test_key_conv_matches_explicit_sum():
    _, k, _ = _qkv()
    taps = jax.random.normal(jax.random.key(5), (3, KVH, D))
    out = np.asarray(causal_key_conv(k, taps))
    kn, tn = np.asarray(k, np.float64), np.asarray(taps, np.float64)
    expected = kn * tn[0]
    expected[:, 1:] += kn[:, :-1] * tn[1]
    expected[:, 2:] += kn[:, :-2] * tn[2]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_bilevel_shares_one_mask_across_heads_from_summed_affinity():
    q, k, _ = _qkv(1)
    selection = bilevel_select(q, k, block=8, top_k=2)
    assert selection.block_mask.shape == (B, 1, T // 8, T // 8)
    merged = bilevel_select(q.reshape(B, T, 1, H * D), jnp.repeat(k, 2, 2).reshape(B, T, 1, H * D),
                            block=8, top_k=2)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(selection.block_mask), np.asarray(merged.block_mask))


def test_cluster_routing_keeps_local_band_and_same_cluster_past_blocks():
    q, k, _ = _qkv(2)
    centroids = normalise(jax.random.normal(jax.random.key(3), (H, 3, D)))
    routing = cluster_select(q, k, centroids, block=8, top_k=2, num_local=2)
    mask = np.asarray(routing.selection.block_mask)
    qc, kc = np.asarray(routing.q_cluster), np.asarray(routing.k_cluster)
    n = T // 8
    for b in range(B):
        for h in range(H):
            for i in range(n):
                local = {j for j in range(n) if i - 2 < j <= i}
                routed = set(np.flatnonzero(mask[b, h, i]).tolist()) - local
                assert local <= set(np.flatnonzero(mask[b, h, i]).tolist())
                assert len(routed) <= 2
                assert all(j < i and kc[b, j, h] == qc[b, i, h] for j in routed)
                same = [j for j in range(i - 1) if kc[b, j, h] == qc[b, i, h]]
                assert len(routed) == min(2, len(same))


def test_centroid_update_moves_only_assigned_clusters():
    centroids = normalise(jnp.eye(3, D)[None])  # [1 head, 3 clusters, D]
    vectors = normalise(jnp.ones((4, 1, D)))
    cluster = jnp.zeros((4, 1), jnp.int32)
    updated = np.asarray(update_centroids(centroids, vectors, cluster, momentum=0.5))
    expected = 0.5 * np.eye(3, D)[0] + 0.5 * np.ones(D) / np.sqrt(D)
    np.testing.assert_allclose(updated[0, 0], expected / np.linalg.norm(expected), rtol=1e-5)
    np.testing.assert_array_equal(updated[0, 1:], np.asarray(centroids)[0, 1:])


def test_dynamic_mask_picks_most_important_blocks():
    importance = jnp.zeros((1, T, 1)).at[0, 3, 0].set(5.0).at[0, 20, 0].set(4.0)
    selection = dynamic_mask_select(importance, heads=2, block=8, top_k=2, num_local=1)
    row = np.flatnonzero(np.asarray(selection.block_mask[0, 0, 7]))
    assert set(row.tolist()) == {0, 2, 7}  # blocks of the two important keys, plus own


def test_key_bias_folding_adds_bias_to_logits():
    q, k, v = _qkv(4)
    bias = jax.random.normal(jax.random.key(6), (B, T, KVH))
    qa, ka, va = append_key_bias(q, k, v, bias, scale=0.3)
    assert qa.shape[-1] % 8 == 0 and va.shape[-1] == qa.shape[-1]
    kr = jnp.repeat(ka, H // KVH, axis=2)
    logits = 0.3 * jnp.einsum("bqhd,bkhd->bhqk", qa, kr)
    expected = 0.3 * jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, 2, 2))
    expected = expected + jnp.repeat(bias, 2, 2).transpose(0, 2, 1)[:, :, None, :]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_shift_to_previous_and_shared_keys():
    x = np.random.default_rng(0).normal(size=(2, 5, 4, 3)).astype(np.float32)
    shifted = np.asarray(shift_to_previous(jnp.asarray(x)))
    np.testing.assert_array_equal(shifted[:, 0], 0.0)
    np.testing.assert_array_equal(shifted[:, 1:], x[:, :-1])
    keys = np.asarray(shared_keys(jnp.asarray(x), 2))  # heads 0, 1 -> kv head 0; 2, 3 -> 1
    np.testing.assert_allclose(keys[:, :, 0], x[:, :, :2].mean(axis=2), rtol=1e-6)
    np.testing.assert_allclose(keys[:, :, 1], x[:, :, 2:].mean(axis=2), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(shared_keys(jnp.asarray(x), 4)), x)
