"""The expert choice router: each expert takes its top-capacity tokens (Zhou et al. 2022),
against numpy float64, alone and through `moe_ffn`."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.moe import moe_ffn
from moejax.routers.base import ROUTERS, Routing
from moejax.routers.base import get as get_router_spec
from moejax.routers.expert_choice import expert_choice, expert_choice_capacity
from tests.moe.dispatch_helpers import ONE_DEVICE, run_moe
from tests.routers.routing_helpers import draw_normal, swiglu64, swiglu_params

jit_expert_choice = jax.jit(
    expert_choice, static_argnames=("top_k", "renormalize", "capacity_factor", "max_slots")
)


def _softmax64(logits: jax.Array) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def _expert_choice_reference(logits: jax.Array, capacity: int) -> np.ndarray:
    """[tokens, experts] bool: expert e takes its `capacity` most probable tokens (float64)."""
    probs = _softmax64(logits)
    chosen = np.zeros(probs.shape, bool)
    for e in range(probs.shape[1]):
        chosen[np.argsort(-probs[:, e], kind="stable")[:capacity], e] = True
    return chosen


def _active_pairs(result: Routing, num_experts: int) -> np.ndarray:
    """[tokens, experts] bool: the (token, expert) pairs with a nonzero combine weight."""
    index, weights = np.asarray(result.expert_index), np.asarray(result.combine_weights)
    active = np.zeros((index.shape[0], num_experts), bool)
    for t, k in zip(*np.nonzero(weights), strict=True):
        active[t, index[t, k]] = True
    return active


def test_expert_choice_is_registered() -> None:
    assert "expert_choice" in ROUTERS
    assert get_router_spec("expert_choice").route is expert_choice


@settings(max_examples=12, deadline=None)
@given(
    num_experts=st.integers(1, 6),
    tokens_per_expert=st.integers(1, 6),
    factor_numerator=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
)
def test_each_expert_takes_exactly_its_top_capacity_tokens(
    num_experts: int, tokens_per_expert: int, factor_numerator: int, seed: int
) -> None:
    # tokens = 2 * experts * m and c = n / 2 make tokens * c / experts = m * n integral.
    tokens = 2 * num_experts * tokens_per_expert
    capacity_factor = factor_numerator / 2
    capacity = expert_choice_capacity(tokens, num_experts, capacity_factor)
    assert capacity == min(tokens, tokens_per_expert * factor_numerator)
    logits = draw_normal(np.random.default_rng(seed), tokens, num_experts, scale=2.0)
    result = jit_expert_choice(
        logits, top_k=1, renormalize=False, capacity_factor=capacity_factor, max_slots=num_experts
    )
    chex.assert_shape((result.expert_index, result.combine_weights), (tokens, num_experts))
    chex.assert_type(result.expert_index, jnp.int32)
    active = _active_pairs(result, num_experts)
    np.testing.assert_array_equal(active.sum(axis=0), capacity)
    np.testing.assert_array_equal(active, _expert_choice_reference(logits, capacity))
    # Each token's slots hold distinct experts, the choosing ones first by probability, with
    # their probabilities as weights.
    index = np.asarray(result.expert_index)
    np.testing.assert_array_equal(
        np.sort(index, axis=-1), np.arange(num_experts)[None].repeat(tokens, 0)
    )
    probs = _softmax64(logits)
    weights = np.asarray(result.combine_weights, np.float64)
    np.testing.assert_allclose(
        weights, np.where(weights != 0, np.take_along_axis(probs, index, -1), 0), rtol=1e-6
    )
    assert np.all(np.diff(weights, axis=-1) <= 0)
    assert float(result.aux_losses["load_balance"]) == 0.0
    assert float(result.aux_losses["truncated_fraction"]) == 0.0


def test_expert_choice_defaults_to_top_k_experts_per_token_on_average() -> None:
    # Nine tokens that only want expert 0, which takes 8 tokens: the ninth (a tie, so the last)
    # is nearly improbable for every other expert and is left without one.
    logits = draw_normal(np.random.default_rng(1), 32, 8).at[:9].set(0.0).at[:9, 0].set(20.0)
    result = jit_expert_choice(logits, top_k=2, max_slots=8)
    active = _active_pairs(result, 8)
    assert active.sum() == 32 * 2
    np.testing.assert_array_equal(active, _expert_choice_reference(logits, 8))
    # Renormalised: every token some expert took has weights summing to 1, the others 0.
    totals = np.asarray(result.combine_weights).sum(axis=-1)
    taken = active.any(axis=-1)
    np.testing.assert_array_equal(np.nonzero(~taken)[0], [8])
    np.testing.assert_allclose(totals[taken], 1.0, rtol=1e-6)
    np.testing.assert_array_equal(totals[~taken], 0.0)
    expected_z = np.mean(np.log(np.exp(np.asarray(logits, np.float64)).sum(-1)) ** 2)
    np.testing.assert_allclose(result.aux_losses["router_z"], expected_z, rtol=1e-5)


def test_expert_choice_max_slots_keeps_the_most_probable_choosers() -> None:
    # c = 3 of 4 experts: most tokens are taken by 3 experts, and the default top_k = 3 slots
    # or 2 slots keep the best of them.
    logits = draw_normal(np.random.default_rng(2), 16, 4)
    full = jit_expert_choice(logits, top_k=3, renormalize=False, max_slots=4)
    active = _active_pairs(full, 4)
    for max_slots in (None, 2):
        bounded = jit_expert_choice(logits, top_k=3, renormalize=False, max_slots=max_slots)
        slots = 3 if max_slots is None else max_slots
        chex.assert_shape(bounded.expert_index, (16, slots))
        np.testing.assert_array_equal(bounded.expert_index, full.expert_index[:, :slots])
        np.testing.assert_array_equal(bounded.combine_weights, full.combine_weights[:, :slots])
        lost = np.maximum(active.sum(axis=-1) - slots, 0).sum() / active.sum()
        assert lost > 0
        np.testing.assert_allclose(bounded.aux_losses["truncated_fraction"], lost, rtol=1e-6)


@pytest.mark.parametrize("strategy", ONE_DEVICE)
@pytest.mark.parametrize("renormalize", [False, True])
def test_expert_choice_moe_matches_per_expert_loop(strategy: str, renormalize: bool) -> None:
    tokens, num_experts, d_model, d_ff, c = 24, 4, 6, 8, 2.0
    rng = np.random.default_rng(3)
    x = draw_normal(rng, tokens, d_model)
    logits = draw_normal(rng, tokens, num_experts, scale=2.0)
    params = swiglu_params(rng, num_experts, d_model, d_ff)
    result = jit_expert_choice(
        logits, top_k=2, renormalize=renormalize, capacity_factor=c, max_slots=num_experts
    )
    # With max_slots = num_experts every expert gets one slot per token: factor 1 drops nothing.
    out = run_moe(x, result, params, strategy=strategy, capacity_factor=1.0)
    assert float(out.dropped_fraction) == 0.0

    capacity = expert_choice_capacity(tokens, num_experts, c)
    chosen = _expert_choice_reference(logits, capacity)  # [tokens, experts]
    weights = np.where(chosen, _softmax64(logits), 0.0)
    if renormalize:
        totals = weights.sum(axis=-1, keepdims=True)
        weights = np.divide(weights, totals, out=np.zeros_like(weights), where=totals > 0)
    x64 = np.asarray(x, np.float64)
    expected = np.zeros_like(x64)
    for e in range(num_experts):
        taken = np.nonzero(chosen[:, e])[0]
        expected[taken] += weights[taken, e, None] * swiglu64(x64[taken], params, e)
    np.testing.assert_allclose(out.y, expected, rtol=1e-5, atol=1e-6)


def test_expert_choice_gradients_reach_logits_and_stay_finite() -> None:
    rng = np.random.default_rng(4)
    x = draw_normal(rng, 16, 4)
    logits = draw_normal(rng, 16, 4)
    params = swiglu_params(rng, 4, 4, 6)

    def loss(logits: jax.Array) -> jax.Array:
        result = expert_choice(logits, top_k=1)
        return jnp.sum(moe_ffn(x, result, params, strategy="dropless").y ** 2)

    grad = jax.jit(jax.grad(loss))(logits)
    assert bool(jnp.all(jnp.isfinite(grad)))
    assert bool(jnp.any(grad != 0.0))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"capacity_factor": 0.0}, "capacity_factor: got 0.0; allowed: finite and > 0"),
        ({"max_slots": 0}, r"max_slots: got 0; allowed: an int in \[1, num_experts=4\]"),
        ({"max_slots": 5}, "max_slots: got 5"),
        ({"top_k": 5}, "top_k: got 5"),
    ],
)
def test_expert_choice_rejects_bad_options(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        expert_choice(jnp.zeros((8, 4)), **{"top_k": 1, **options})
