"""Expert-level compression: routing statistics, expert pruning, MC-SMoE's grouping, neuron
alignment, merging and low-rank-plus-sparse compression, and Read-ME's MoE-fication and
pre-gating router, checked in float64 against the SwiGLU experts they stand for."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.pruning.experts import (
    align_neurons,
    dominant_groups,
    expert_frequency,
    expert_importance,
    low_rank_plus_sparse,
    merge_experts,
    merged_router,
    permute_neurons,
    prune_experts,
)
from moejax.pruning.read_me import (
    fit_pregating_router,
    moefy_ffn,
    oracle_expert_scores,
    pregate,
)


def _silu(z):
    return z / (1.0 + np.exp(-z))


def _expert_output(x, expert):
    """One SwiGLU expert, `x [tokens, d_model]` -> `[tokens, d_model]`."""
    return (_silu(x @ expert["w_gate"]) * (x @ expert["w_up"])) @ expert["w_down"]


def _expert(rng, d_model=6, d_ff=10):
    return {
        "w_gate": rng.normal(size=(d_model, d_ff)),
        "w_up": rng.normal(size=(d_model, d_ff)),
        "w_down": rng.normal(size=(d_ff, d_model)),
    }


def _stack(experts):
    return {name: np.stack([e[name] for e in experts]) for name in ("w_gate", "w_up", "w_down")}


def _unstack(weights, index):
    return {name: value[index] for name, value in weights.items()}


def test_expert_frequency_is_share_of_tokens_per_expert():
    index = np.array([[0, 1], [0, 2], [0, 1]])
    np.testing.assert_allclose(expert_frequency(index, 4), [1.0, 2 / 3, 1 / 3, 0.0])


def test_expert_importance_sums_router_probabilities():
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    np.testing.assert_allclose(expert_importance(probs), [0.6, 0.4, 1.0])


def test_prune_experts_keeps_top_scores_in_order_and_router_columns_follow():
    rng = np.random.default_rng(0)
    weights = _stack([_expert(rng) for _ in range(5)])
    router = rng.normal(size=(6, 5))
    scores = np.array([0.1, 0.9, 0.5, 0.5, 0.7])  # the tie at 0.5 goes to expert 2
    pruned, new_router, kept = prune_experts(weights, router, scores, 3)
    np.testing.assert_array_equal(kept, [1, 2, 4])
    for name, value in weights.items():
        np.testing.assert_array_equal(pruned[name], value[[1, 2, 4]])
    np.testing.assert_array_equal(new_router, router[:, [1, 2, 4]])
    assert prune_experts(weights, None, scores, 2).router is None


def test_dominant_groups_puts_a_near_duplicate_in_its_dominants_group():
    rng = np.random.default_rng(1)
    router = rng.normal(size=(16, 6))
    router[:, 5] = router[:, 1] + 0.05 * rng.normal(size=16)
    logits = rng.normal(size=(300, 16)) @ router  # [tokens, experts]
    frequency = np.array([0.5, 0.4, 0.6, 0.1, 0.2, 0.2])
    groups = dominant_groups(logits, frequency, 3)
    # Dominant experts 0, 1, 2 are groups 0, 1, 2 in their original order.
    np.testing.assert_array_equal(groups[:3], [0, 1, 2])
    assert groups[5] == groups[1]
    # The router weight's columns serve as per-expert vectors too.
    assert dominant_groups(router, frequency, 3)[5] == 1


def test_dominant_groups_compares_directions_not_sizes():
    # Expert 2 points along dominant 0; dominant 1 is ten times longer and 45 degrees off,
    # so it wins on inner product but not on cosine similarity.
    vectors = np.array([[1.0, 10.0, 1.0], [0.0, 10.0, 0.05]])  # [features, experts]
    assert dominant_groups(vectors, np.array([0.5, 0.4, 0.1]), 2)[2] == 0


def test_permuting_neurons_keeps_the_expert_and_alignment_recovers_the_permutation():
    rng = np.random.default_rng(2)
    reference = _expert(rng, d_ff=24)
    permutation = rng.permutation(24)
    other = permute_neurons(reference, permutation)
    x = rng.normal(size=(7, 6))
    np.testing.assert_allclose(
        _expert_output(x, other), _expert_output(x, reference), rtol=1e-12, atol=1e-12
    )
    alignment = align_neurons(reference, other)
    np.testing.assert_array_equal(alignment, np.argsort(permutation))
    for name, value in permute_neurons(other, alignment).items():
        np.testing.assert_array_equal(value, reference[name])


def test_merging_permuted_copies_of_an_expert_is_lossless():
    rng = np.random.default_rng(3)
    base, other = _expert(rng), _expert(rng)
    copies = [permute_neurons(base, rng.permutation(10)) for _ in range(2)]
    weights = _stack([copies[0], other, base, copies[1]])
    groups = np.array([0, 1, 0, 0])
    merged, expert_to_group, dominant = merge_experts(weights, groups, [0.2, 0.3, 0.5, 0.1])
    np.testing.assert_array_equal(expert_to_group, groups)
    np.testing.assert_array_equal(dominant, [2, 1])
    x = rng.normal(size=(9, 6))
    for member in (0, 2, 3):
        np.testing.assert_allclose(
            _expert_output(x, _unstack(merged, 0)),
            _expert_output(x, _unstack(weights, member)),
            rtol=1e-12,
            atol=1e-12,
        )
    for name in weights:
        np.testing.assert_array_equal(merged[name][1], other[name])


def test_merge_averages_aligned_members_by_frequency_uniform_when_all_zero():
    rng = np.random.default_rng(4)
    first = _expert(rng)
    second = {name: value + 0.01 * rng.normal(size=value.shape) for name, value in first.items()}
    weights = _stack([first, second])
    groups = np.array([0, 0])
    weighted = merge_experts(weights, groups, [0.3, 0.1]).weights
    uniform = merge_experts(weights, groups, [0.0, 0.0]).weights
    for name in weights:
        np.testing.assert_allclose(weighted[name][0], 0.75 * first[name] + 0.25 * second[name])
        np.testing.assert_allclose(uniform[name][0], 0.5 * first[name] + 0.5 * second[name])


def test_jax_inputs_give_numpy_results_in_the_weights_dtype():
    weights = {name: jnp.asarray(value, jnp.float32) for name, value in _weights().items()}
    merged = merge_experts(weights, jnp.array([0, 1, 0]), jnp.array([0.5, 0.2, 0.3])).weights
    pruned = prune_experts(weights, jnp.ones((6, 3)), jnp.array([0.1, 0.3, 0.2]), 2)
    for result in (merged, pruned.weights):
        assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in result.values())
    np.testing.assert_array_equal(pruned.kept, [1, 2])


def test_merged_router_takes_each_groups_dominant_column():
    rng = np.random.default_rng(5)
    router = rng.normal(size=(6, 5))
    groups = np.array([1, 0, 1, 0, 1])
    frequency = np.array([0.1, 0.2, 0.6, 0.4, 0.3])
    np.testing.assert_array_equal(merged_router(router, groups, frequency), router[:, [3, 2]])


def test_low_rank_plus_sparse_error_falls_with_rank_and_vanishes_at_full_rank():
    rng = np.random.default_rng(6)
    w = rng.normal(size=(12, 8))
    errors = []
    for rank in range(9):
        u, v, sparse = low_rank_plus_sparse(w, rank, 0.75)
        assert u.shape == (12, rank) and v.shape == (rank, 8)
        assert np.count_nonzero(sparse) <= 96 - 72
        errors.append(np.linalg.norm(w - u @ v - sparse))
    assert all(later < earlier for earlier, later in zip(errors, errors[1:], strict=False))
    assert errors[-1] < 1e-10
    # The sparse part holds the largest entries of the residual left by the low-rank part.
    kept = sparse != 0
    left = np.abs(w - u @ v - sparse)
    assert np.abs(sparse[kept]).min() >= left.max()
    # A rank-2 matrix with planted spikes separates into the two.
    low = rng.normal(size=(12, 2)) @ rng.normal(size=(2, 8))
    spikes = np.zeros_like(low)
    spikes.reshape(-1)[rng.choice(96, 5, replace=False)] = 20.0
    u, v, sparse = low_rank_plus_sparse(low + spikes, 2, 1 - 5 / 96, iterations=30)
    np.testing.assert_array_equal(sparse != 0, spikes != 0)
    np.testing.assert_allclose(u @ v + sparse, low + spikes, atol=1e-6)
    # With no sparse part it is the truncated SVD.
    u, v, sparse = low_rank_plus_sparse(w, 3, 1.0)
    singular = np.linalg.svd(w, compute_uv=False)
    np.testing.assert_allclose(np.linalg.norm(w - u @ v), np.linalg.norm(singular[3:]))
    assert not sparse.any()


def _dense_ffn(rng, d_model=8, d_ff=32, tokens=64):
    w_gate, w_up = rng.normal(size=(d_model, d_ff)), rng.normal(size=(d_model, d_ff))
    w_down = rng.normal(size=(d_ff, d_model))
    x = rng.normal(size=(tokens, d_model))
    hidden = _silu(x @ w_gate) * (x @ w_up)
    return w_gate, w_up, w_down, x, hidden


def test_moefied_ffn_with_every_expert_selected_equals_the_dense_ffn():
    rng = np.random.default_rng(7)
    w_gate, w_up, w_down, x, hidden = _dense_ffn(rng)
    weights, partition = moefy_ffn(w_gate, w_up, w_down, hidden, 4)
    assert weights["w_gate"].shape == (4, 8, 8) and weights["w_down"].shape == (4, 8, 8)
    assert partition.shape == (4, 8)
    np.testing.assert_array_equal(np.sort(partition.reshape(-1)), np.arange(32))
    dense = hidden @ w_down
    summed = sum(_expert_output(x, _unstack(weights, e)) for e in range(4))
    np.testing.assert_allclose(summed, dense, rtol=1e-10, atol=1e-10)


def _planted_activations(rng, d_ff=32, experts=4, tokens=240):
    """Hidden activations whose neurons fire in `experts` planted groups, shuffled: each token
    mostly uses one group's neurons. Returns (activations, the groups as sets, token groups)."""
    size = d_ff // experts
    token_group = rng.integers(experts, size=tokens)
    neuron_group = np.repeat(np.arange(experts), size)
    active = token_group[:, None] == neuron_group[None, :]  # [tokens, d_ff]
    magnitude = np.where(active, 1.0, 0.1) * rng.uniform(0.5, 1.5, size=(tokens, d_ff))
    activations = magnitude * rng.choice([-1.0, 1.0], size=(tokens, d_ff))
    shuffle = rng.permutation(d_ff)
    activations = activations[:, shuffle]
    groups = [set(np.flatnonzero(neuron_group[shuffle] == g)) for g in range(experts)]
    return activations, groups, token_group


def test_balanced_partition_recovers_planted_co_activation_groups():
    rng = np.random.default_rng(8)
    activations, planted, token_group = _planted_activations(rng)
    d_model = 4
    w_gate, w_up = rng.normal(size=(d_model, 32)), rng.normal(size=(d_model, 32))
    w_down = rng.normal(size=(32, d_model))
    partition = moefy_ffn(w_gate, w_up, w_down, activations, 4).partition
    assert [len(neurons) for neurons in partition] == [8, 8, 8, 8]
    found = [set(neurons.tolist()) for neurons in partition]
    assert sorted(map(sorted, found)) == sorted(map(sorted, planted))
    # The oracle sends each token to the expert holding its planted group.
    expert_of_group = [found.index(group) for group in planted]
    oracle = oracle_expert_scores(activations, partition)
    np.testing.assert_array_equal(np.argmax(oracle, axis=1), np.take(expert_of_group, token_group))


def test_pregating_router_reproduces_a_planted_token_to_expert_map():
    rng = np.random.default_rng(9)
    vocab, experts, top_k = 40, 6, 2
    planted = np.stack([rng.permutation(experts)[:top_k] for _ in range(vocab)])  # [vocab, 2]
    ids = rng.integers(vocab - 1, size=3000)  # the last id never occurs
    targets = planted[ids]
    noisy = rng.random(len(ids)) < 0.1
    targets[noisy] = rng.integers(experts, size=(noisy.sum(), top_k))
    table = fit_pregating_router(ids, targets, vocab, experts)
    assert table.shape == (vocab, experts)
    seen = np.arange(vocab - 1)
    np.testing.assert_array_equal(
        np.sort(pregate(table, seen, top_k), axis=1), np.sort(planted[seen], axis=1)
    )
    np.testing.assert_allclose(table[-1], expert_frequency(targets, experts))
    # Scores in place of indices: the oracle's mass is highest on the planted experts.
    scores = rng.uniform(0, 0.3, size=(len(ids), experts))
    np.put_along_axis(scores, planted[ids], 1.0, axis=1)
    from_scores = fit_pregating_router(ids, scores, vocab, experts)
    np.testing.assert_array_equal(
        np.sort(pregate(from_scores, seen, top_k), axis=1), np.sort(planted[seen], axis=1)
    )


def _weights(experts=3):
    return _stack([_expert(np.random.default_rng(e)) for e in range(experts)])


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: expert_frequency(np.array([[0, 3]]), 3), "expert_index"),
        (lambda: expert_frequency(np.array([0, 1]), 3), "expert_index.shape"),
        (lambda: prune_experts(_weights(), None, np.ones(3), 4), "keep"),
        (lambda: prune_experts(_weights(), np.ones((6, 2)), np.ones(3), 2), "router.shape"),
        (lambda: prune_experts(_weights(), None, np.ones(4), 2), "weights['w_gate'].shape"),
        (lambda: dominant_groups(np.ones((5, 3)), np.ones(3), 4), "num_groups"),
        (lambda: dominant_groups(np.ones((5, 3)), np.ones(2), 2), "frequency.shape"),
        (lambda: merge_experts(_weights(), np.array([0, 2, 0]), np.ones(3)), "groups"),
        (lambda: merge_experts(_weights(), np.array([0, 1, 0]), -np.ones(3)), "frequency"),
        (
            lambda: merge_experts({"w_gate": np.ones((3, 2, 2))}, [0, 0, 0], np.ones(3)),
            "weights names",
        ),
        (lambda: align_neurons(_expert(np.random.default_rng(0)), {}), "other names"),
        (lambda: permute_neurons(_expert(np.random.default_rng(0)), [0] * 10), "permutation"),
        (lambda: low_rank_plus_sparse(np.ones((4, 3)), 4, 0.5), "rank"),
        (lambda: low_rank_plus_sparse(np.ones((4, 3)), 1, 1.5), "sparsity"),
        (
            lambda: moefy_ffn(*_dense_ffn(np.random.default_rng(0))[:3], np.ones((4, 32)), 5),
            "num_experts",
        ),
        (
            lambda: moefy_ffn(*_dense_ffn(np.random.default_rng(0))[:3], np.ones((4, 31)), 4),
            "hidden_activations.shape",
        ),
        (lambda: oracle_expert_scores(np.ones((4, 4)), np.array([[0, 1], [1, 3]])), "partition"),
        (lambda: fit_pregating_router(np.array([0, 9]), np.array([[0], [1]]), 5, 2), "token_ids"),
        (lambda: fit_pregating_router(np.array([0, 1]), np.ones((2, 3)), 5, 2), "targets.shape"),
        (lambda: pregate(np.ones((5, 2)), np.array([0]), 3), "top_k"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_field(call, field):
    with pytest.raises(ValueError, match=f"^{re.escape(field)}: got"):
        call()
