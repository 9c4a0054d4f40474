"""Dispatch strategies against a per-token, per-expert float64 loop, and against each other."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.moe import (
    DISPATCH_STRATEGIES,
    MoEOutput,
    capacity_dispatch,
    dropless_dispatch,
    expert_capacity,
    moe_ffn,
)
from moejax.routing import Routing, softmax_top_k

# Strategy, capacity factor and kernel choice pick the program, so they are static under jit.
jit_moe_ffn = jax.jit(moe_ffn, static_argnames=("strategy", "capacity_factor", "gmm_impl"))
jit_capacity_dispatch = jax.jit(capacity_dispatch, static_argnames="capacity")
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


def _dropped_by_priority(expert_index: np.ndarray, capacity: int) -> np.ndarray:
    """[tokens, top_k] bool: all first choices in token order, then all second choices, ..."""
    expert_index = np.asarray(expert_index)
    filled = np.zeros(expert_index.max() + 1, dtype=int)
    dropped = np.zeros(expert_index.shape, dtype=bool)
    for k in range(expert_index.shape[1]):
        for t in range(expert_index.shape[0]):
            e = expert_index[t, k]
            dropped[t, k] = filled[e] >= capacity
            filled[e] += 1
    return dropped


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
