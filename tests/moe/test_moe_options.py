"""Shared experts, batch-prioritised capacity and expert init, against numpy float64.

The expert choice router's tests are in tests/routers/test_expert_choice.py."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe import (
    CAPACITY_PRIORITIES,
    DISPATCH_STRATEGIES,
    capacity_dispatch,
    moe_ffn,
    shared_expert_ffn,
)
from moejax.routers.softmax_top_k import softmax_top_k
from tests.routers.routing_helpers import draw_normal, swiglu64, swiglu_params

jit_moe_ffn = jax.jit(
    moe_ffn, static_argnames=("strategy", "capacity_factor", "gmm_impl", "priority")
)
jit_capacity_dispatch = jax.jit(capacity_dispatch, static_argnames=("capacity", "priority"))
jit_softmax_top_k = jax.jit(softmax_top_k, static_argnames=("top_k", "renormalize"))


# --- shared experts --------------------------------------------------------------------------


def test_shared_experts_match_float64_sum_and_add_to_every_strategy() -> None:
    rng = np.random.default_rng(5)
    x = draw_normal(rng, 12, 6)
    shared = swiglu_params(rng, 2, 6, 10)
    x64 = np.asarray(x, np.float64)
    expected = swiglu64(x64, shared, 0) + swiglu64(x64, shared, 1)
    out = jax.jit(shared_expert_ffn)(x, shared)
    chex.assert_type(out, jnp.float32)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

    routing = jit_softmax_top_k(draw_normal(rng, 12, 4), top_k=2)
    params = swiglu_params(rng, 4, 6, 8)
    for strategy in DISPATCH_STRATEGIES:
        routed = jit_moe_ffn(x, routing, params, strategy=strategy, capacity_factor=2.0)
        both = jit_moe_ffn(
            x, routing, params, strategy=strategy, capacity_factor=2.0, shared_params=shared
        )
        np.testing.assert_allclose(both.y, np.asarray(routed.y) + expected, rtol=1e-5, atol=1e-5)

    bf16 = jax.jit(shared_expert_ffn)(x.astype(jnp.bfloat16), shared)
    chex.assert_type(bf16, jnp.bfloat16)
    np.testing.assert_allclose(bf16.astype(jnp.float32), expected, rtol=5e-2, atol=5e-2)


def test_shared_experts_reject_mismatched_shapes() -> None:
    rng = np.random.default_rng(6)
    x = draw_normal(rng, 4, 6)
    shared = swiglu_params(rng, 2, 6, 10)
    with pytest.raises(ValueError, match=r"shared_params\['w_down'\]: expected shape \(2, 10, 6\)"):
        shared_expert_ffn(x, {**shared, "w_down": shared["w_down"][:, :, :5]})
    with pytest.raises(ValueError, match=r"shared_params\['w_gate'\]: expected \[num_shared"):
        shared_expert_ffn(x, {**shared, "w_gate": shared["w_gate"][0]})
    with pytest.raises(ValueError, match=r"shared_params: missing \['w_up'\]"):
        shared_expert_ffn(x, {"w_gate": shared["w_gate"], "w_down": shared["w_down"]})


# --- batch-prioritised capacity --------------------------------------------------------------


def _bpr_dropped(expert_index: np.ndarray, weights: np.ndarray, capacity: int) -> np.ndarray:
    """[tokens, top_k] bool: tokens ranked by max weight (stable), first choices before second."""
    ranking = np.argsort(-weights.max(axis=-1), kind="stable")
    filled = np.zeros(expert_index.max() + 1, dtype=int)
    dropped = np.zeros(expert_index.shape, bool)
    for k in range(expert_index.shape[1]):
        for t in ranking:
            e = expert_index[t, k]
            dropped[t, k] = filled[e] >= capacity
            filled[e] += 1
    return dropped


@pytest.mark.parametrize(("top_k", "capacity"), [(1, 2), (2, 3), (3, 2)])
def test_score_priority_keeps_the_batch_prioritized_set(top_k: int, capacity: int) -> None:
    rng = np.random.default_rng(7)
    x = draw_normal(rng, 16, 6)
    routing = jit_softmax_top_k(draw_normal(rng, 16, 4, scale=2.0), top_k=top_k, renormalize=False)
    params = swiglu_params(rng, 4, 6, 5)
    index, weights = np.asarray(routing.expert_index), np.asarray(routing.combine_weights)
    dropped = _bpr_dropped(index, weights, capacity)
    assert dropped.any()
    y, dropped_fraction = jit_capacity_dispatch(
        x, routing, params, capacity=capacity, priority="score"
    )
    np.testing.assert_allclose(dropped_fraction, dropped.mean(), rtol=1e-7)
    x64 = np.asarray(x, np.float64)
    expected = np.zeros_like(x64)
    for t, k in zip(*np.nonzero(~dropped), strict=True):
        expected[t] += weights[t, k] * swiglu64(x64[t], params, index[t, k])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_score_priority_keeps_the_highest_scoring_tokens_of_a_full_expert() -> None:
    # Every token wants expert 2; three slots go to the three largest probabilities.
    rng = np.random.default_rng(8)
    logits = jnp.zeros((8, 4)).at[:, 2].set(jnp.asarray(rng.permutation(8) + 1.0, jnp.float32))
    routing = jit_softmax_top_k(logits, top_k=1, renormalize=False)
    params = swiglu_params(rng, 4, 5, 5)
    y, _ = jit_capacity_dispatch(
        draw_normal(rng, 8, 5), routing, params, capacity=3, priority="score"
    )
    kept = np.asarray(jnp.any(y != 0.0, axis=-1))
    np.testing.assert_array_equal(kept, np.asarray(logits[:, 2]) >= 6)


def test_priorities_agree_when_nothing_is_dropped() -> None:
    rng = np.random.default_rng(9)
    x = draw_normal(rng, 20, 6)
    routing = jit_softmax_top_k(draw_normal(rng, 20, 4), top_k=2, renormalize=False)
    params = swiglu_params(rng, 4, 6, 7)
    outs = [
        jit_moe_ffn(x, routing, params, strategy="capacity", capacity_factor=2.0, priority=p)
        for p in CAPACITY_PRIORITIES
    ]
    for out in outs:
        assert float(out.dropped_fraction) == 0.0
    np.testing.assert_allclose(outs[0].y, outs[1].y, rtol=1e-6, atol=1e-7)


def test_priority_rejects_unknown_value() -> None:
    rng = np.random.default_rng(10)
    x = draw_normal(rng, 4, 3)
    routing = jit_softmax_top_k(draw_normal(rng, 4, 2), top_k=1)
    params = swiglu_params(rng, 2, 3, 3)
    match = r"priority: unknown value 'random'; allowed: order, score"
    for strategy in DISPATCH_STRATEGIES:
        with pytest.raises(ValueError, match=match):
            moe_ffn(x, routing, params, strategy=strategy, priority="random")
    with pytest.raises(ValueError, match=match):
        capacity_dispatch(x, routing, params, capacity=2, priority="random")


def test_init_expert_params_shapes_and_fan_in_scale():
    from moejax.moe import init_expert_params

    params = init_expert_params(jax.random.key(0), 4, 64, 256)
    chex.assert_shape([params["w_gate"], params["w_up"]], (4, 64, 256))
    chex.assert_shape(params["w_down"], (4, 256, 64))
    np.testing.assert_allclose(float(jnp.std(params["w_gate"])), 64**-0.5, rtol=0.05)
    np.testing.assert_allclose(float(jnp.std(params["w_down"])), 256**-0.5, rtol=0.05)
