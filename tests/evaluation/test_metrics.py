"""Routing and sparsity metrics against plain numpy loops."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.metrics import (
    ExpertAffinity,
    active_experts_per_token,
    chunk_sparsity,
    chunk_union_sizes,
    drop_rate_by_position,
    expert_affinity,
    expert_load,
    layer_metrics,
    mean_off_diagonal,
    router_cosine_similarity,
    routing_fluctuation,
    routing_fluctuation_from_probs,
    token_sparsity,
)
from moejax.routers.base import Routing, routing_statistics
from moejax.routers.softmax_top_k import softmax_top_k

SEEDS = st.integers(0, 2**31 - 1)


def _routing_arrays(
    tokens: int, experts: int, top_k: int, seed: int, inactive: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct experts per token; a share `inactive` of slots marked unused, half by index -1
    and half by combine weight 0 (the two conventions variable-k routers use)."""
    rng = np.random.default_rng(seed)
    index = np.stack([rng.permutation(experts)[:top_k] for _ in range(tokens)]).astype(np.int32)
    weights = rng.uniform(0.1, 1.0, (tokens, top_k)).astype(np.float32)
    unused = rng.random((tokens, top_k)) < inactive
    by_index = unused & (rng.random((tokens, top_k)) < 0.5)
    index[by_index] = -1
    weights[unused & ~by_index] = 0.0
    return index.reshape(tokens, top_k), weights


def _is_active(index: int, weight: float) -> bool:
    return index >= 0 and weight != 0


@settings(max_examples=20, deadline=None)
@given(tokens=st.integers(1, 12), experts=st.integers(1, 6), data=st.data())
def test_expert_load_counts_only_active_slots(tokens: int, experts: int, data) -> None:
    top_k = data.draw(st.integers(1, experts))
    index, weights = _routing_arrays(tokens, experts, top_k, data.draw(SEEDS))
    counts = np.zeros(experts)
    for t in range(tokens):
        for s in range(top_k):
            if _is_active(index[t, s], weights[t, s]):
                counts[index[t, s]] += 1
    expected = counts / counts.sum() if counts.sum() else counts
    load = jax.jit(expert_load, static_argnums=2)(index, weights, experts)
    chex.assert_shape(load, (experts,))
    chex.assert_type(load, jnp.float32)
    np.testing.assert_allclose(load, expected, rtol=1e-6, atol=1e-6)


def test_expert_load_matches_routing_statistics_when_every_slot_is_active() -> None:
    routing = softmax_top_k(jax.random.normal(jax.random.key(0), (32, 6)), top_k=2)
    np.testing.assert_allclose(
        expert_load(routing.expert_index, routing.combine_weights, 6),
        routing_statistics(routing, 6)["expert_load"],
        rtol=1e-6,
    )


@settings(max_examples=20, deadline=None)
@given(tokens=st.integers(1, 12), experts=st.integers(1, 6), data=st.data())
def test_token_sparsity_counts_inactive_slots_as_unused(tokens: int, experts: int, data) -> None:
    top_k = data.draw(st.integers(1, experts))
    index, weights = _routing_arrays(tokens, experts, top_k, data.draw(SEEDS))
    per_token = [
        sum(_is_active(index[t, s], weights[t, s]) for s in range(top_k)) for t in range(tokens)
    ]
    np.testing.assert_allclose(
        active_experts_per_token(index, weights), np.mean(per_token), rtol=1e-6
    )
    sparsity = jax.jit(token_sparsity, static_argnums=2)(index, weights, experts)
    chex.assert_shape(sparsity, ())
    np.testing.assert_allclose(sparsity, 1.0 - np.mean(per_token) / experts, rtol=1e-6, atol=1e-6)


def test_token_sparsity_of_a_fixed_k_router_is_one_minus_k_over_experts() -> None:
    routing = softmax_top_k(jax.random.normal(jax.random.key(1), (16, 8)), top_k=2)
    sparsity = token_sparsity(routing.expert_index, routing.combine_weights, 8)
    np.testing.assert_allclose(sparsity, 1.0 - 2 / 8, rtol=1e-6, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 10),
    experts=st.integers(1, 6),
    data=st.data(),
)
def test_chunk_union_sizes_match_python_sets(batch: int, length: int, experts: int, data) -> None:
    top_k = data.draw(st.integers(1, experts))
    chunk_size = data.draw(st.integers(1, length))
    index, weights = _routing_arrays(batch * length, experts, top_k, data.draw(SEEDS))
    num_chunks = length // chunk_size
    expected = np.zeros((batch, num_chunks), np.int32)
    for b in range(batch):
        for c in range(num_chunks):
            union = set()
            for p in range(c * chunk_size, (c + 1) * chunk_size):
                t = b * length + p
                union |= {
                    int(index[t, s]) for s in range(top_k) if _is_active(index[t, s], weights[t, s])
                }
            expected[b, c] = len(union)
    sizes_fn = jax.jit(chunk_union_sizes, static_argnames=("num_experts", "chunk_size", "seq_len"))
    flat = sizes_fn(index, weights, num_experts=experts, chunk_size=chunk_size, seq_len=length)
    chex.assert_shape(flat, (batch, num_chunks))
    chex.assert_type(flat, jnp.int32)
    np.testing.assert_array_equal(flat, expected)
    shaped = sizes_fn(
        index.reshape(batch, length, top_k),
        weights.reshape(batch, length, top_k),
        num_experts=experts,
        chunk_size=chunk_size,
    )
    np.testing.assert_array_equal(shaped, expected)
    sparsity = chunk_sparsity(index, weights, experts, chunk_size=chunk_size, seq_len=length)
    np.testing.assert_allclose(sparsity, 1.0 - expected.mean() / experts, rtol=1e-6, atol=1e-6)


def test_chunk_sparsity_with_one_token_chunks_is_token_sparsity() -> None:
    index, weights = _routing_arrays(24, 8, 3, seed=5)
    np.testing.assert_allclose(
        chunk_sparsity(index, weights, 8, chunk_size=1, seq_len=6),
        token_sparsity(index, weights, 8),
        rtol=1e-6,
    )


def test_chunks_do_not_cross_sequences() -> None:
    # Two sequences of 3 tokens, one expert each; a chunk spanning the boundary would see 2.
    index = np.array([[0], [0], [0], [1], [1], [1]], np.int32)
    weights = np.ones((6, 1), np.float32)
    sizes = chunk_union_sizes(index, weights, 2, chunk_size=3, seq_len=3)
    np.testing.assert_array_equal(sizes, [[1], [1]])


def test_chunk_metrics_reject_bad_chunk_size_and_seq_len() -> None:
    index, weights = _routing_arrays(8, 4, 2, seed=0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_union_sizes(index, weights, 4, chunk_size=5, seq_len=4)
    with pytest.raises(ValueError, match="seq_len"):
        chunk_union_sizes(index, weights, 4, chunk_size=2, seq_len=3)


@settings(max_examples=20, deadline=None)
@given(tokens=st.integers(1, 16), experts=st.integers(2, 6), seed=SEEDS)
def test_routing_fluctuation_is_the_share_of_changed_top1_experts(
    tokens: int, experts: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    before = rng.integers(0, experts, (tokens, 2)).astype(np.int32)
    after = rng.integers(0, experts, (tokens, 2)).astype(np.int32)
    expected = np.mean([before[t, 0] != after[t, 0] for t in range(tokens)])
    np.testing.assert_allclose(routing_fluctuation(before, after), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(routing_fluctuation(before, before), 0.0)
    # A cyclic shift of the expert ids has no fixed point: every token changes expert.
    np.testing.assert_allclose(routing_fluctuation(before, (before + 1) % experts), 1.0)


def test_routing_fluctuation_from_probs_compares_argmax_experts() -> None:
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(2), (10, 4)), axis=-1)
    derangement = probs[:, jnp.array([1, 2, 3, 0])]
    chex.assert_shape(routing_fluctuation_from_probs(probs, probs), ())
    np.testing.assert_allclose(routing_fluctuation_from_probs(probs, probs), 0.0)
    np.testing.assert_allclose(routing_fluctuation_from_probs(probs, derangement), 1.0)
    with pytest.raises(ValueError, match="other_router_probs"):
        routing_fluctuation_from_probs(probs, probs[:5])


@settings(max_examples=20, deadline=None)
@given(tokens=st.integers(1, 20), experts=st.integers(1, 5), seed=SEEDS)
def test_expert_affinity_rows_are_conditional_frequencies(
    tokens: int, experts: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    # -1 marks a token without an active expert at that layer; it is left out.
    first = rng.integers(-1, experts, tokens).astype(np.int32)
    second = rng.integers(-1, experts, tokens).astype(np.int32)
    counts = np.zeros((experts, experts))
    for a, b in zip(first, second, strict=True):
        if a >= 0 and b >= 0:
            counts[a, b] += 1
    rows = counts.sum(axis=1, keepdims=True)
    expected = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    affinity = jax.jit(expert_affinity, static_argnums=2)(first, second, experts)
    assert isinstance(affinity, ExpertAffinity)
    chex.assert_shape(affinity.conditional, (experts, experts))
    chex.assert_type([affinity.conditional, affinity.predictability], jnp.float32)
    np.testing.assert_allclose(affinity.conditional, expected, rtol=1e-6, atol=1e-7)
    row_sums = np.asarray(affinity.conditional).sum(axis=1)
    np.testing.assert_allclose(row_sums, (rows[:, 0] > 0).astype(np.float64), rtol=1e-6, atol=1e-6)
    predictable = counts.max(axis=1).sum() / counts.sum() if counts.sum() else 0.0
    np.testing.assert_allclose(affinity.predictability, predictable, rtol=1e-6, atol=1e-6)


def test_expert_affinity_of_a_fixed_expert_mapping_is_a_permutation_matrix() -> None:
    first = jnp.arange(12, dtype=jnp.int32) % 4
    affinity = expert_affinity(first, (first + 1) % 4, 4)
    np.testing.assert_array_equal(affinity.conditional, np.roll(np.eye(4), 1, axis=1))
    np.testing.assert_allclose(affinity.predictability, 1.0)


@settings(max_examples=20, deadline=None)
@given(d_model=st.integers(1, 8), experts=st.integers(1, 6), seed=SEEDS)
def test_router_cosine_matrix_is_symmetric_with_unit_diagonal(
    d_model: int, experts: int, seed: int
) -> None:
    weights = np.random.default_rng(seed).normal(size=(d_model, experts)).astype(np.float32)
    cosine = jax.jit(router_cosine_similarity)(weights)
    chex.assert_shape(cosine, (experts, experts))
    chex.assert_type(cosine, jnp.float32)
    np.testing.assert_allclose(cosine, np.asarray(cosine).T, atol=1e-6)
    np.testing.assert_allclose(np.diag(cosine), 1.0, rtol=1e-5)
    w = weights.astype(np.float64)
    expected = np.array(
        [
            [
                w[:, i] @ w[:, j] / (np.linalg.norm(w[:, i]) * np.linalg.norm(w[:, j]))
                for j in range(experts)
            ]
            for i in range(experts)
        ]
    )
    np.testing.assert_allclose(cosine, expected, atol=1e-5)
    off = [expected[i, j] for i in range(experts) for j in range(experts) if i != j]
    np.testing.assert_allclose(mean_off_diagonal(cosine), np.mean(off) if off else 0.0, atol=1e-5)


def test_orthogonal_router_directions_have_zero_mean_similarity() -> None:
    cosine = router_cosine_similarity(3.0 * jnp.eye(5, 4))
    np.testing.assert_allclose(cosine, np.eye(4), atol=1e-7)
    np.testing.assert_allclose(mean_off_diagonal(cosine), 0.0, atol=1e-7)


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 3), length=st.integers(1, 9), top_k=st.integers(1, 3), data=st.data())
def test_drop_rate_by_position_matches_loop(batch: int, length: int, top_k: int, data) -> None:
    rng = np.random.default_rng(data.draw(SEEDS))
    dropped = rng.random((batch, length, top_k)) < 0.4
    active = rng.random((batch, length, top_k)) < 0.8
    num_buckets = data.draw(st.integers(1, length))
    drops, totals = np.zeros(length), np.zeros(length)
    for b in range(batch):
        for p in range(length):
            for s in range(top_k):
                totals[p] += active[b, p, s]
                drops[p] += active[b, p, s] and dropped[b, p, s]
    rates = drop_rate_by_position(dropped, active=active)
    chex.assert_shape(rates, (length,))
    chex.assert_type(rates, jnp.float32)
    expected = np.divide(drops, totals, out=np.zeros(length), where=totals > 0)
    np.testing.assert_allclose(rates, expected, rtol=1e-6, atol=1e-6)
    bucket_drops, bucket_totals = np.zeros(num_buckets), np.zeros(num_buckets)
    for p in range(length):
        bucket_drops[p * num_buckets // length] += drops[p]
        bucket_totals[p * num_buckets // length] += totals[p]
    flat = jax.jit(drop_rate_by_position, static_argnames=("seq_len", "num_buckets"))(
        dropped.reshape(-1, top_k),
        active=active.reshape(-1, top_k),
        seq_len=length,
        num_buckets=num_buckets,
    )
    chex.assert_shape(flat, (num_buckets,))
    np.testing.assert_allclose(
        flat,
        np.divide(bucket_drops, bucket_totals, out=np.zeros(num_buckets), where=bucket_totals > 0),
        rtol=1e-6,
    )


def test_layer_metrics_jits_with_names_shapes_and_dtypes() -> None:
    batch, seq_len, experts, top_k = 2, 16, 8, 2
    index, weights = _routing_arrays(batch * seq_len, experts, top_k, seed=3)
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(4), (batch * seq_len, experts)))
    routing = Routing(jnp.asarray(index), jnp.asarray(weights), probs, aux_losses={})
    dropped = jax.random.bernoulli(jax.random.key(5), 0.2, index.shape)
    compute = jax.jit(
        functools.partial(layer_metrics, num_experts=experts, seq_len=seq_len, num_buckets=4)
    )
    metrics = compute(routing, dropped=dropped)
    scalars = [
        "load_max_over_mean",
        "routing_entropy",
        "active_experts_per_token",
        "token_sparsity",
        "chunk_sparsity",
    ]
    assert set(metrics) == {"expert_load", "drop_rate_by_position", *scalars}
    chex.assert_shape(metrics["expert_load"], (experts,))
    chex.assert_shape(metrics["drop_rate_by_position"], (4,))
    chex.assert_shape([metrics[name] for name in scalars], ())
    chex.assert_type(list(metrics.values()), jnp.float32)
    np.testing.assert_allclose(
        metrics["load_max_over_mean"],
        np.max(metrics["expert_load"]) / np.mean(metrics["expert_load"]),
        rtol=1e-6,
    )
    assert metrics["chunk_sparsity"] <= metrics["token_sparsity"] + 1e-6
    assert "drop_rate_by_position" not in layer_metrics(routing, experts, seq_len=seq_len)
