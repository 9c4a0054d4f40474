"""The "capacity" strategy (`moejax.moe.capacity`): drops in priority order against a float64
loop, gradients against a float64 masked reference, batch-prioritised routing, and its options."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moejax import moe
from moejax.config import ConfigError
from moejax.moe import CAPACITY_PRIORITIES, CapacityOptions, capacity_dispatch, expert_capacity
from moejax.routers.base import Routing
from tests.moe.dispatch_helpers import (
    dropped_by_priority,
    jit_softmax_top_k,
    loop_reference,
    problem,
    run_moe,
)
from tests.routers.routing_helpers import draw_normal, swiglu64, swiglu_params

jit_capacity_dispatch = jax.jit(capacity_dispatch, static_argnames=("capacity", "priority"))


def _priority_ranking(combine_weights: np.ndarray, priority: str) -> np.ndarray:
    """Tokens in the order `priority` gives them slots: by position, or by max weight (stable)."""
    if priority == "order":
        return np.arange(combine_weights.shape[0])
    return np.argsort(-np.asarray(combine_weights, np.float64).max(axis=-1), kind="stable")


def _masked_reference(
    x: jax.Array,
    expert_index: jax.Array,
    combine_weights: jax.Array,
    params: dict[str, jax.Array],
    kept: jax.Array,
) -> jax.Array:
    """Every expert on every token, then each token's kept assignments, weighted: differentiable,
    so jax.grad of it in float64 is a gradient reference sharing no code with the strategies."""
    gate = jnp.einsum("td,edf->tef", x, params["w_gate"])
    hidden = jax.nn.silu(gate) * jnp.einsum("td,edf->tef", x, params["w_up"])
    every = jnp.einsum("tef,efd->ted", hidden, params["w_down"])  # [tokens, experts, d_model]
    chosen = jnp.take_along_axis(every, expert_index[:, :, None], axis=1)  # [tokens, k, d]
    return jnp.einsum("tkd,tk->td", chosen, combine_weights * kept)


@pytest.mark.parametrize(("top_k", "capacity"), [(1, 1), (2, 2), (2, 5), (3, 3)])
def test_capacity_drops_in_priority_order(top_k: int, capacity: int) -> None:
    x, routing, params = problem(16, 4, top_k, 6, 5, seed=3)
    dropped = dropped_by_priority(routing.expert_index, capacity)
    assert dropped.any()
    y, dropped_fraction = jit_capacity_dispatch(x, routing, params, capacity=capacity)
    chex.assert_type(dropped_fraction, jnp.float32)
    np.testing.assert_allclose(dropped_fraction, dropped.mean(), rtol=1e-7)
    expected = loop_reference(x, routing.expert_index, routing.combine_weights, params, dropped)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


@st.composite
def capacity_problems(draw: st.DrawFn) -> tuple[Routing, int, str, tuple[int, int, int]]:
    """A hand-drawn routing: repeated experts within a token, weights from three values (ties in
    priority "score"), and a capacity from 1 to a balanced expert's load, so that busy experts
    overflow and who keeps the slots matters."""
    num_experts = draw(st.integers(1, 5))
    top_k = draw(st.integers(1, 3))
    tokens = draw(st.integers(1, 12))
    shape = (tokens, top_k)
    expert_index = draw(hnp.arrays(np.int32, shape, elements=st.integers(0, num_experts - 1)))
    weights = draw(hnp.arrays(np.float32, shape, elements=st.sampled_from([0.25, 0.5, 1.0])))
    capacity = draw(st.integers(1, max(1, tokens * top_k // num_experts)))
    priority = draw(st.sampled_from(CAPACITY_PRIORITIES))
    routing = Routing(
        jnp.asarray(expert_index), jnp.asarray(weights), jnp.zeros((tokens, num_experts)), {}
    )
    sizes = (num_experts, draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    return routing, capacity, priority, sizes


def _capacity_problem_inputs(
    routing: Routing, sizes: tuple[int, int, int], seed: int = 0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    num_experts, d_model, d_ff = sizes
    x, _, params = problem(routing.expert_index.shape[0], num_experts, 1, d_model, d_ff, seed)
    return x, params


@settings(max_examples=15, deadline=None)
@given(capacity_problems())
def test_index_dispatch_matches_loop_reference_with_drops(problem: tuple) -> None:
    routing, capacity, priority, sizes = problem
    x, params = _capacity_problem_inputs(routing, sizes)
    ranking = _priority_ranking(routing.combine_weights, priority)
    dropped = dropped_by_priority(routing.expert_index, capacity, ranking)
    y, dropped_fraction = jit_capacity_dispatch(
        x, routing, params, capacity=capacity, priority=priority
    )
    np.testing.assert_allclose(dropped_fraction, dropped.mean(), rtol=1e-7)
    expected = loop_reference(x, routing.expert_index, routing.combine_weights, params, dropped)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=6, deadline=None)
@given(capacity_problems())
def test_index_dispatch_gradients_match_float64_reference(problem: tuple) -> None:
    routing, capacity, priority, sizes = problem
    x, params = _capacity_problem_inputs(routing, sizes, seed=1)
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal(x.shape), jnp.float32)
    ranking = _priority_ranking(routing.combine_weights, priority)
    kept = ~dropped_by_priority(routing.expert_index, capacity, ranking)

    def capacity_loss(x, combine_weights, params) -> jax.Array:
        weights_routing = Routing(routing.expert_index, combine_weights, None, {})
        y, _ = capacity_dispatch(x, weights_routing, params, capacity=capacity, priority=priority)
        return jnp.sum(y * cotangent)

    def reference_loss(x, combine_weights, params) -> jax.Array:
        y = _masked_reference(x, routing.expert_index, combine_weights, params, kept)
        return jnp.sum(y * cotangent)

    inputs = (x, routing.combine_weights, params)
    grads = jax.jit(jax.grad(capacity_loss, argnums=(0, 1, 2)))(*inputs)
    with jax.enable_x64(True):
        inputs64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), inputs)
        expected = jax.grad(reference_loss, argnums=(0, 1, 2))(*inputs64)
        expected = jax.tree.map(np.asarray, expected)
    chex.assert_trees_all_close(grads, expected, rtol=1e-5, atol=1e-5)


def _intermediates(jaxpr: jax.extend.core.Jaxpr) -> list[tuple[str, jax.core.ShapedArray]]:
    """(primitive, output aval) of every equation, sub-jaxprs (jit, custom_vjp) included."""
    found = []
    for eqn in jaxpr.eqns:
        found += [(eqn.primitive.name, var.aval) for var in eqn.outvars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += _intermediates(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += _intermediates(sub)
    return found


@pytest.mark.parametrize("priority", CAPACITY_PRIORITIES)
def test_capacity_gradient_has_no_one_hot_tensor_or_row_scatter(priority: str) -> None:
    tokens, num_experts, top_k, d_model = 64, 16, 2, 8
    x, routing, params = problem(tokens, num_experts, top_k, d_model, 8, seed=12)
    capacity = expert_capacity(tokens, num_experts, top_k, 1.25)

    def loss(x, combine_weights, params) -> jax.Array:
        weights_routing = Routing(routing.expert_index, combine_weights, None, {})
        y, _ = capacity_dispatch(x, weights_routing, params, capacity=capacity, priority=priority)
        return jnp.sum(y**2)

    grad = jax.grad(loss, argnums=(0, 1, 2))
    found = _intermediates(jax.make_jaxpr(grad)(x, routing.combine_weights, params).jaxpr)
    # One-hot dispatch would build [tokens, experts, capacity] tensors; rows move by gathers
    # both ways, so no floating scatter-add exists either.
    assert max(aval.size for _, aval in found) < tokens * num_experts * capacity
    assert not [aval for name, aval in found if "scatter" in name and aval.dtype == x.dtype]


def test_dropped_assignments_contribute_exactly_zero() -> None:
    x, routing, params = problem(16, 4, 2, 6, 5, seed=4)
    capacity = 2
    dropped = jnp.asarray(dropped_by_priority(routing.expert_index, capacity))

    def capacity_y(combine_weights: jax.Array) -> jax.Array:
        weights_routing = Routing(
            routing.expert_index, combine_weights, routing.router_probs, routing.aux_losses
        )
        return jit_capacity_dispatch(x, weights_routing, params, capacity=capacity)[0]

    # Any weight on a dropped assignment leaves the output bit-for-bit unchanged...
    inflated = jnp.where(dropped, 1e3, routing.combine_weights)
    np.testing.assert_array_equal(capacity_y(routing.combine_weights), capacity_y(inflated))
    # ...and receives no gradient.
    grad = jax.grad(lambda w: jnp.sum(capacity_y(w)))(routing.combine_weights)
    np.testing.assert_array_equal(jnp.where(dropped, grad, 0.0), 0.0)
    assert bool(jnp.all(jnp.where(dropped, 1.0, grad) != 0.0))


def test_tokens_with_every_assignment_dropped_output_zero() -> None:
    x, _, params = problem(8, 4, 1, 6, 5, seed=5)
    routing = jit_softmax_top_k(jnp.zeros((8, 4)).at[:, 3].set(10.0), top_k=1)
    y, dropped_fraction = jit_capacity_dispatch(x, routing, params, capacity=3)
    np.testing.assert_allclose(dropped_fraction, 5 / 8)
    np.testing.assert_array_equal(y[3:], 0.0)
    assert bool(jnp.all(jnp.any(y[:3] != 0.0, axis=-1)))


# --- batch-prioritised capacity --------------------------------------------------------------


def _bpr_dropped(expert_index: np.ndarray, weights: np.ndarray, capacity: int) -> np.ndarray:
    """[tokens, top_k] bool: tokens ranked by max weight (stable), first choices before second."""
    return dropped_by_priority(expert_index, capacity, _priority_ranking(weights, "score"))


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
        run_moe(x, routing, params, strategy="capacity", capacity_factor=2.0, priority=p)
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
    with pytest.raises(
        ConfigError,
        match=r"model.moe.dispatch.options.priority: got 'random'; allowed: order, score",
    ):
        CapacityOptions(priority="random")
    with pytest.raises(ValueError, match=r"priority: got 'random'; allowed: order, score"):
        capacity_dispatch(x, routing, params, capacity=2, priority="random")


# --- options --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"capacity_factor": 0.0}, "options.capacity_factor: got 0.0; allowed: a positive"),
        ({"eval_capacity_factor": -1.0}, "options.eval_capacity_factor: got -1.0; allowed: >= 0"),
        ({"schedule": "zigzag"}, "options.schedule: got 'zigzag'; allowed: uniform, descending"),
        ({"schedule_spread": 1.0}, "options.schedule_spread: got 1.0; allowed: in [0, 1)"),
    ],
)
def test_options_are_checked_when_built(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        CapacityOptions(**options)


def test_evaluation_uses_the_eval_capacity_factor() -> None:
    # Every token wants expert 0: factor 1 keeps 8 * 1 / 4 = 2 slots, factor 4 keeps all 8.
    x, _, params = problem(8, 4, 1, 6, 5, seed=13)
    routing = jit_softmax_top_k(jnp.zeros((8, 4)).at[:, 0].set(10.0), top_k=1)
    options = {"capacity_factor": 1.0, "eval_capacity_factor": 4.0}
    train = run_moe(x, routing, params, strategy="capacity", **options)
    evaluation = run_moe(x, routing, params, strategy="capacity", train=False, **options)
    np.testing.assert_allclose(train.dropped_fraction, 6 / 8)
    assert float(evaluation.dropped_fraction) == 0.0
    # 0 keeps the training factor at evaluation.
    kept = run_moe(x, routing, params, strategy="capacity", train=False, capacity_factor=1.0)
    np.testing.assert_allclose(kept.dropped_fraction, 6 / 8)


def test_schedule_sets_each_layers_capacity_factor() -> None:
    options = CapacityOptions(capacity_factor=1.0, schedule="descending", schedule_spread=0.5)
    factors = [options.at_depth(i, 3).capacity_factor for i in range(3)]
    np.testing.assert_allclose(factors, [1.5, 1.0, 0.5])
    assert options.at_depth(0, 3).schedule == "uniform"
    # The schedule is read by the model, not passed to the dispatch function.
    assert "schedule" not in options.dispatch_arguments()
    assert moe.get("capacity").options is CapacityOptions
