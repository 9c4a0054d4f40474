"""DeepSeek-V3's router: sigmoid affinities, experts chosen only inside the best groups by
biased affinity, weights from the unbiased affinities (renormalised, scaled)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.routers.group_limited_sigmoid import GroupLimitedOptions, group_limited_sigmoid


def _reference(logits, bias, *, top_k, num_groups, top_groups, renormalize, scaling):
    """Token by token in float64: the groups by the sum of their two best biased affinities,
    then the top-k experts of the kept groups."""
    scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    biased = scores + bias
    size = logits.shape[1] // num_groups
    chosen, weights = [], []
    for row, row_scores in zip(biased, scores, strict=True):
        groups = row.reshape(num_groups, size)
        group_scores = np.sort(groups, axis=1)[:, -2:].sum(axis=1)
        kept = np.argsort(-group_scores, kind="stable")[:top_groups]
        eligible = np.concatenate([np.arange(g * size, (g + 1) * size) for g in kept])
        best = eligible[np.argsort(-row[eligible], kind="stable")[:top_k]]
        w = row_scores[best]
        if renormalize:
            w = w / w.sum()
        chosen.append(best)
        weights.append(w * scaling)
    return np.array(chosen), np.array(weights)


@settings(max_examples=12, deadline=None)
@given(
    tokens=st.integers(1, 12),
    num_groups=st.sampled_from([1, 2, 4]),
    per_group=st.integers(2, 4),
    top_k=st.integers(1, 4),
    renormalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_the_group_by_group_reference(
    tokens, num_groups, per_group, top_k, renormalize, seed
):
    experts = num_groups * per_group
    top_groups = max(1, num_groups // 2)
    top_k = min(top_k, top_groups * per_group)
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(tokens, experts)).astype(np.float32) * 2
    bias = (rng.normal(size=experts) * 0.3).astype(np.float32)
    routing = group_limited_sigmoid(
        jnp.asarray(logits),
        top_k=top_k,
        renormalize=renormalize,
        num_groups=num_groups,
        top_groups=top_groups,
        scaling=2.5,
        expert_bias=jnp.asarray(bias),
    )
    index, weights = _reference(
        logits,
        bias,
        top_k=top_k,
        num_groups=num_groups,
        top_groups=top_groups,
        renormalize=renormalize,
        scaling=2.5,
    )
    np.testing.assert_array_equal(np.sort(routing.expert_index, axis=1), np.sort(index, axis=1))
    order = np.argsort(routing.expert_index, axis=1)
    reference_order = np.argsort(index, axis=1)
    np.testing.assert_allclose(
        np.take_along_axis(np.asarray(routing.combine_weights), order, axis=1),
        np.take_along_axis(weights, reference_order, axis=1),
        rtol=1e-5,
    )


def test_an_expert_outside_the_kept_groups_is_never_chosen_however_high():
    """Group 1 holds the single best expert but the worse pair; one group is kept."""
    logits = jnp.array([[1.0, 1.0, 3.0, -3.0]])
    routing = group_limited_sigmoid(logits, top_k=2, num_groups=2, top_groups=1)
    assert sorted(np.asarray(routing.expert_index)[0].tolist()) == [0, 1]


def test_the_bias_steers_the_choice_and_carries_no_gradient():
    logits = jax.random.normal(jax.random.key(0), (8, 4))
    bias = jnp.array([0.0, 0.0, 10.0, 0.0])
    routing = group_limited_sigmoid(logits, top_k=1, renormalize=False, expert_bias=bias)
    assert np.all(np.asarray(routing.expert_index) == 2)
    np.testing.assert_allclose(routing.combine_weights[:, 0], jax.nn.sigmoid(logits[:, 2]))
    grad = jax.grad(
        lambda b: jnp.sum(group_limited_sigmoid(logits, top_k=2, expert_bias=b).combine_weights)
    )(bias)
    np.testing.assert_array_equal(grad, 0.0)


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match="top_groups"):
        GroupLimitedOptions(num_groups=2, top_groups=3)
    with pytest.raises(ValueError, match="num_groups"):
        group_limited_sigmoid(jnp.zeros((2, 6)), top_k=1, num_groups=4)
