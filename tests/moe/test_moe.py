"""Dispatch strategies against a per-token, per-expert float64 loop, and against each other."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moejax.moe import (
    CAPACITY_PRIORITIES,
    DISPATCH_STRATEGIES,
    MoEOutput,
    capacity_dispatch,
    dropless_dispatch,
    expert_capacity,
    moe_ffn,
)
from moejax.routers.base import Routing
from moejax.routers.softmax_top_k import softmax_top_k

# Strategy, capacity factor and kernel choice pick the program, so they are static under jit.
jit_moe_ffn = jax.jit(moe_ffn, static_argnames=("strategy", "capacity_factor", "gmm_impl"))
jit_capacity_dispatch = jax.jit(capacity_dispatch, static_argnames=("capacity", "priority"))
jit_softmax_top_k = jax.jit(softmax_top_k, static_argnames=("top_k", "renormalize"))


def _problem(
    tokens: int,
    num_experts: int,
    top_k: int,
    d_model: int,
    d_ff: int,
    seed: int = 0,
    dtype: jnp.dtype = jnp.float32,
) -> tuple[jax.Array, Routing, dict[str, jax.Array]]:
    """Random activations, a softmax top-k routing and SwiGLU expert weights of unit-ish scale."""
    # numpy draws and a jitted router: eager jax would compile every op anew for each shape.
    rng = np.random.default_rng(seed)

    def normal(*shape: int, scale: float = 1.0) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape) * scale, dtype)

    x = normal(tokens, d_model)
    routing = jit_softmax_top_k(normal(tokens, num_experts).astype(jnp.float32), top_k=top_k)
    params = {
        "w_gate": normal(num_experts, d_model, d_ff, scale=d_model**-0.5),
        "w_up": normal(num_experts, d_model, d_ff, scale=d_model**-0.5),
        "w_down": normal(num_experts, d_ff, d_model, scale=d_ff**-0.5),
    }
    return x, routing, params


def _loop_reference(
    x: jax.Array,
    expert_index: jax.Array,
    combine_weights: jax.Array,
    params: dict[str, jax.Array],
    dropped: np.ndarray | None = None,
) -> np.ndarray:
    """For each token, for each of its experts (unless dropped): that expert's SwiGLU, weighted."""
    x = np.asarray(x, np.float64)
    w = {name: np.asarray(value, np.float64) for name, value in params.items()}
    expert_index = np.asarray(expert_index)
    combine_weights = np.asarray(combine_weights, np.float64)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(expert_index.shape[1]):
            if dropped is not None and dropped[t, k]:
                continue
            e = expert_index[t, k]
            gate = x[t] @ w["w_gate"][e]
            silu = gate / (1.0 + np.exp(-gate))
            y[t] += combine_weights[t, k] * ((silu * (x[t] @ w["w_up"][e])) @ w["w_down"][e])
    return y


def _dropped_by_priority(
    expert_index: np.ndarray, capacity: int, ranking: np.ndarray | None = None
) -> np.ndarray:
    """[tokens, top_k] bool: all first choices in `ranking`'s token order (default: by position),
    then all second choices, ..."""
    expert_index = np.asarray(expert_index)
    if ranking is None:
        ranking = np.arange(expert_index.shape[0])
    filled = np.zeros(expert_index.max() + 1, dtype=int)
    dropped = np.zeros(expert_index.shape, dtype=bool)
    for k in range(expert_index.shape[1]):
        for t in ranking:
            e = expert_index[t, k]
            dropped[t, k] = filled[e] >= capacity
            filled[e] += 1
    return dropped


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


@st.composite
def moe_sizes(draw: st.DrawFn) -> tuple[int, int, int, int, int, int]:
    num_experts = draw(st.integers(1, 6))
    top_k = draw(st.integers(1, num_experts))
    tokens = draw(st.integers(1, 12))
    d_model = draw(st.integers(1, 8))
    d_ff = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    return tokens, num_experts, top_k, d_model, d_ff, seed


@settings(max_examples=15, deadline=None)
@given(moe_sizes())
def test_capacity_and_dropless_match_loop_reference(sizes: tuple) -> None:
    x, routing, params = _problem(*sizes)
    num_experts = sizes[1]
    # Factor num_experts gives every expert tokens * top_k slots: nothing can be dropped.
    capacity = jit_moe_ffn(
        x, routing, params, strategy="capacity", capacity_factor=float(num_experts)
    )
    dropless = jit_moe_ffn(x, routing, params, strategy="dropless")
    for out in (capacity, dropless):
        chex.assert_shape(out.y, x.shape)
        chex.assert_type(out.y, jnp.float32)
        chex.assert_shape(out.dropped_fraction, ())
        assert float(out.dropped_fraction) == 0.0
    np.testing.assert_allclose(capacity.y, dropless.y, rtol=1e-5, atol=1e-6)
    expected = _loop_reference(x, routing.expert_index, routing.combine_weights, params)
    np.testing.assert_allclose(capacity.y, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dropless.y, expected, rtol=1e-5, atol=1e-6)


def test_strategies_match_loop_reference_in_float64() -> None:
    with jax.enable_x64(True):
        x, routing, params = _problem(24, 5, 2, 8, 16, seed=1, dtype=jnp.float64)
        expected = _loop_reference(x, routing.expert_index, routing.combine_weights, params)
        for strategy in DISPATCH_STRATEGIES:
            out = jit_moe_ffn(x, routing, params, strategy=strategy, capacity_factor=5.0)
            chex.assert_type(out.y, jnp.float64)
            np.testing.assert_allclose(out.y, expected, rtol=1e-12, atol=1e-12)


def test_strategies_agree_when_a_token_repeats_an_expert() -> None:
    # Not a softmax top-k routing, but a valid input: token 0 sends both assignments to expert 1.
    x, _, params = _problem(4, 3, 2, 6, 5, seed=2)
    expert_index = jnp.array([[1, 1], [0, 2], [2, 2], [1, 0]], jnp.int32)
    combine_weights = jnp.array([[0.7, 0.3], [0.5, 0.5], [0.2, 0.9], [1.0, 0.1]], jnp.float32)
    routing = Routing(expert_index, combine_weights, jnp.zeros((4, 3)), {})
    expected = _loop_reference(x, expert_index, combine_weights, params)
    for strategy in DISPATCH_STRATEGIES:
        out = jit_moe_ffn(x, routing, params, strategy=strategy, capacity_factor=3.0)
        np.testing.assert_allclose(out.y, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("top_k", "capacity"), [(1, 1), (2, 2), (2, 5), (3, 3)])
def test_capacity_drops_in_priority_order(top_k: int, capacity: int) -> None:
    x, routing, params = _problem(16, 4, top_k, 6, 5, seed=3)
    dropped = _dropped_by_priority(routing.expert_index, capacity)
    assert dropped.any()
    y, dropped_fraction = jit_capacity_dispatch(x, routing, params, capacity=capacity)
    chex.assert_type(dropped_fraction, jnp.float32)
    np.testing.assert_allclose(dropped_fraction, dropped.mean(), rtol=1e-7)
    expected = _loop_reference(x, routing.expert_index, routing.combine_weights, params, dropped)
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
    x, _, params = _problem(routing.expert_index.shape[0], num_experts, 1, d_model, d_ff, seed)
    return x, params


@settings(max_examples=25, deadline=None)
@given(capacity_problems())
def test_index_dispatch_matches_loop_reference_with_drops(problem: tuple) -> None:
    routing, capacity, priority, sizes = problem
    x, params = _capacity_problem_inputs(routing, sizes)
    ranking = _priority_ranking(routing.combine_weights, priority)
    dropped = _dropped_by_priority(routing.expert_index, capacity, ranking)
    y, dropped_fraction = jit_capacity_dispatch(
        x, routing, params, capacity=capacity, priority=priority
    )
    np.testing.assert_allclose(dropped_fraction, dropped.mean(), rtol=1e-7)
    expected = _loop_reference(x, routing.expert_index, routing.combine_weights, params, dropped)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=10, deadline=None)
@given(capacity_problems())
def test_index_dispatch_gradients_match_float64_reference(problem: tuple) -> None:
    routing, capacity, priority, sizes = problem
    x, params = _capacity_problem_inputs(routing, sizes, seed=1)
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal(x.shape), jnp.float32)
    ranking = _priority_ranking(routing.combine_weights, priority)
    kept = ~_dropped_by_priority(routing.expert_index, capacity, ranking)

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
    x, routing, params = _problem(tokens, num_experts, top_k, d_model, 8, seed=12)
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
    x, routing, params = _problem(16, 4, 2, 6, 5, seed=4)
    capacity = 2
    dropped = jnp.asarray(_dropped_by_priority(routing.expert_index, capacity))

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
    x, _, params = _problem(8, 4, 1, 6, 5, seed=5)
    routing = jit_softmax_top_k(jnp.zeros((8, 4)).at[:, 3].set(10.0), top_k=1)
    y, dropped_fraction = jit_capacity_dispatch(x, routing, params, capacity=3)
    np.testing.assert_allclose(dropped_fraction, 5 / 8)
    np.testing.assert_array_equal(y[3:], 0.0)
    assert bool(jnp.all(jnp.any(y[:3] != 0.0, axis=-1)))


def test_dropless_and_capacity_gradients_agree() -> None:
    x, routing, params = _problem(24, 4, 2, 8, 12, seed=6)
    cotangent = jnp.asarray(np.random.default_rng(7).standard_normal(x.shape), jnp.float32)

    def loss(strategy: str, x, combine_weights, params) -> jax.Array:
        weights_routing = Routing(
            routing.expert_index, combine_weights, routing.router_probs, routing.aux_losses
        )
        out = moe_ffn(x, weights_routing, params, strategy=strategy, capacity_factor=4.0)
        return jnp.sum(out.y * cotangent)

    grads = {
        strategy: jax.jit(jax.grad(functools.partial(loss, strategy), argnums=(0, 1, 2)))(
            x, routing.combine_weights, params
        )
        for strategy in DISPATCH_STRATEGIES
    }
    chex.assert_trees_all_equal_shapes_and_dtypes(grads["capacity"], grads["dropless"])
    chex.assert_trees_all_close(grads["capacity"], grads["dropless"], rtol=1e-5, atol=1e-6)
    for leaf in jax.tree.leaves(grads["dropless"]):
        assert bool(jnp.any(leaf != 0.0))


def test_gradients_flow_from_output_to_router_logits() -> None:
    x, _, params = _problem(12, 4, 2, 6, 5, seed=8)
    logits = jnp.asarray(np.random.default_rng(9).standard_normal((12, 4)), jnp.float32)

    def loss(strategy: str, logits: jax.Array) -> jax.Array:
        routing = softmax_top_k(logits, top_k=2)
        out = moe_ffn(x, routing, params, strategy=strategy, capacity_factor=4.0)
        return jnp.sum(out.y**2)

    grads = [jax.jit(jax.grad(functools.partial(loss, s)))(logits) for s in DISPATCH_STRATEGIES]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    assert bool(jnp.any(grads[0] != 0.0))


@pytest.mark.parametrize("strategy", DISPATCH_STRATEGIES)
@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float32])
def test_bf16_inputs_give_bf16_output(strategy: str, param_dtype: jnp.dtype) -> None:
    x, routing, params = _problem(16, 4, 2, 16, 32, seed=10)
    out = jit_moe_ffn(
        x.astype(jnp.bfloat16),
        routing,
        jax.tree.map(lambda w: w.astype(param_dtype), params),
        strategy=strategy,
        capacity_factor=4.0,
    )
    chex.assert_type(out.y, jnp.bfloat16)
    chex.assert_shape(out.y, x.shape)
    full = jit_moe_ffn(x, routing, params, strategy=strategy, capacity_factor=4.0)
    np.testing.assert_allclose(out.y.astype(jnp.float32), full.y, rtol=5e-2, atol=5e-2)


def test_expert_capacity_formula() -> None:
    assert expert_capacity(4096, 4, 2, 1.25) == 2560
    assert expert_capacity(10, 3, 1, 1.0) == 4
    # 10 * 1.1 is 11.000000000000002 in floats; the capacity is still 11.
    assert expert_capacity(10, 1, 1, 1.1) == 11
    assert expert_capacity(1, 8, 1, 0.1) == 1


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((16, 4, 2, 0.0), "capacity_factor: got 0.0; allowed: finite and > 0"),
        ((16, 4, 2, float("nan")), "capacity_factor: got nan"),
        ((16, 0, 1, 1.0), "num_experts: got 0"),
        ((16, 4, 5, 1.0), "top_k: got 5"),
    ],
)
def test_expert_capacity_rejects_bad_arguments(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        expert_capacity(*args)


def test_moe_ffn_rejects_unknown_strategy() -> None:
    x, routing, params = _problem(4, 2, 1, 3, 3)
    with pytest.raises(
        ValueError, match=r"strategy: unknown value 'dense'; allowed: capacity, dropless"
    ):
        moe_ffn(x, routing, params, strategy="dense")


def test_dropless_rejects_unknown_gmm_impl() -> None:
    x, routing, params = _problem(4, 2, 1, 3, 3)
    with pytest.raises(ValueError, match=r"impl: unknown value 'cuda'"):
        moe_ffn(x, routing, params, strategy="dropless", gmm_impl="cuda")


def test_moe_ffn_returns_pytree_output() -> None:
    x, routing, params = _problem(4, 2, 1, 3, 3)
    out = jit_moe_ffn(x, routing, params, strategy="dropless")
    assert isinstance(out, MoEOutput)
    assert len(jax.tree.leaves(out)) == 2


@pytest.mark.parametrize("strategy", DISPATCH_STRATEGIES)
def test_strategies_reject_mismatched_shapes(strategy: str) -> None:
    x, routing, params = _problem(4, 2, 1, 3, 5)
    with pytest.raises(ValueError, match="x: expected"):
        moe_ffn(x[0], routing, params, strategy=strategy)
    with pytest.raises(ValueError, match=r"expert_params\['w_down'\]: expected shape \(2, 5, 3\)"):
        moe_ffn(x, routing, {**params, "w_down": params["w_up"]}, strategy=strategy)
    with pytest.raises(ValueError, match=r"expert_params\['w_gate'\]: expected \[experts"):
        moe_ffn(x, routing, {**params, "w_gate": params["w_gate"][0]}, strategy=strategy)
    with pytest.raises(ValueError, match="expert_params: missing"):
        moe_ffn(x, routing, {"w_up": params["w_up"]}, strategy=strategy)
    with pytest.raises(ValueError, match="expert_params: missing"):
        moe_ffn(x, routing, {"w_gate": params["w_gate"]}, strategy=strategy)
    with pytest.raises(ValueError, match=r"routing.expert_index: expected \[tokens=3"):
        moe_ffn(x[:3], routing, params, strategy=strategy)
    with pytest.raises(ValueError, match="routing.combine_weights"):
        bad = Routing(routing.expert_index, routing.combine_weights[:, :0], None, {})
        moe_ffn(x, bad, params, strategy=strategy)


def test_dropless_dispatch_jits_with_xla_gmm() -> None:
    x, routing, params = _problem(10, 3, 2, 4, 6, seed=11)
    y, dropped_fraction = jax.jit(dropless_dispatch, static_argnames="gmm_impl")(
        x, routing, params, gmm_impl="xla"
    )
    expected = _loop_reference(x, routing.expert_index, routing.combine_weights, params)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    assert float(dropped_fraction) == 0.0
