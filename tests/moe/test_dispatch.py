"""The dispatch contract (`moejax.moe.dispatch`): every strategy against a per-token float64 loop
and against each other, the registry, the checks at registration, and the expert-shards rule."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax import moe
from moejax.moe import DispatchOptions, DispatchSpec, MoEOutput, moe_ffn
from moejax.parallel import sharding
from moejax.routers.base import Routing
from moejax.routers.softmax_top_k import softmax_top_k
from tests.moe.dispatch_helpers import ONE_DEVICE, loop_reference, options_for, problem, run_moe
from tests.routers.routing_helpers import draw_normal, swiglu64, swiglu_params


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
    x, routing, params = problem(*sizes)
    num_experts = sizes[1]
    # Factor num_experts gives every expert tokens * top_k slots: nothing can be dropped.
    capacity = run_moe(x, routing, params, strategy="capacity", capacity_factor=float(num_experts))
    dropless = run_moe(x, routing, params, strategy="dropless")
    for out in (capacity, dropless):
        chex.assert_shape(out.y, x.shape)
        chex.assert_type(out.y, jnp.float32)
        chex.assert_shape(out.dropped_fraction, ())
        assert float(out.dropped_fraction) == 0.0
    np.testing.assert_allclose(capacity.y, dropless.y, rtol=1e-5, atol=1e-6)
    expected = loop_reference(x, routing.expert_index, routing.combine_weights, params)
    np.testing.assert_allclose(capacity.y, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dropless.y, expected, rtol=1e-5, atol=1e-6)


def test_strategies_match_loop_reference_in_float64() -> None:
    with jax.enable_x64(True):
        x, routing, params = problem(24, 5, 2, 8, 16, seed=1, dtype=jnp.float64)
        expected = loop_reference(x, routing.expert_index, routing.combine_weights, params)
        for strategy in ONE_DEVICE:
            out = run_moe(x, routing, params, strategy=strategy, capacity_factor=5.0)
            chex.assert_type(out.y, jnp.float64)
            np.testing.assert_allclose(out.y, expected, rtol=1e-12, atol=1e-12)


def test_strategies_agree_when_a_token_repeats_an_expert() -> None:
    # Not a softmax top-k routing, but a valid input: token 0 sends both assignments to expert 1.
    x, _, params = problem(4, 3, 2, 6, 5, seed=2)
    expert_index = jnp.array([[1, 1], [0, 2], [2, 2], [1, 0]], jnp.int32)
    combine_weights = jnp.array([[0.7, 0.3], [0.5, 0.5], [0.2, 0.9], [1.0, 0.1]], jnp.float32)
    routing = Routing(expert_index, combine_weights, jnp.zeros((4, 3)), {})
    expected = loop_reference(x, expert_index, combine_weights, params)
    for strategy in ONE_DEVICE:
        out = run_moe(x, routing, params, strategy=strategy, capacity_factor=3.0)
        np.testing.assert_allclose(out.y, expected, rtol=1e-5, atol=1e-6)


def test_dropless_and_capacity_gradients_agree() -> None:
    x, routing, params = problem(24, 4, 2, 8, 12, seed=6)
    cotangent = jnp.asarray(np.random.default_rng(7).standard_normal(x.shape), jnp.float32)

    def loss(strategy: str, x, combine_weights, params) -> jax.Array:
        weights_routing = Routing(
            routing.expert_index, combine_weights, routing.router_probs, routing.aux_losses
        )
        options = options_for(strategy, capacity_factor=4.0)
        out = moe_ffn(x, weights_routing, params, strategy=strategy, options=options)
        return jnp.sum(out.y * cotangent)

    grads = {
        strategy: jax.jit(jax.grad(functools.partial(loss, strategy), argnums=(0, 1, 2)))(
            x, routing.combine_weights, params
        )
        for strategy in ONE_DEVICE
    }
    chex.assert_trees_all_equal_shapes_and_dtypes(grads["capacity"], grads["dropless"])
    chex.assert_trees_all_close(grads["capacity"], grads["dropless"], rtol=1e-5, atol=1e-6)
    for leaf in jax.tree.leaves(grads["dropless"]):
        assert bool(jnp.any(leaf != 0.0))


def test_gradients_flow_from_output_to_router_logits() -> None:
    x, _, params = problem(12, 4, 2, 6, 5, seed=8)
    logits = jnp.asarray(np.random.default_rng(9).standard_normal((12, 4)), jnp.float32)

    def loss(strategy: str, logits: jax.Array) -> jax.Array:
        routing = softmax_top_k(logits, top_k=2)
        options = options_for(strategy, capacity_factor=4.0)
        out = moe_ffn(x, routing, params, strategy=strategy, options=options)
        return jnp.sum(out.y**2)

    grads = [jax.jit(jax.grad(functools.partial(loss, s)))(logits) for s in ONE_DEVICE]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    assert bool(jnp.any(grads[0] != 0.0))


@pytest.mark.parametrize("strategy", ONE_DEVICE)
@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float32])
def test_bf16_inputs_give_bf16_output(strategy: str, param_dtype: jnp.dtype) -> None:
    x, routing, params = problem(16, 4, 2, 16, 32, seed=10)
    out = run_moe(
        x.astype(jnp.bfloat16),
        routing,
        jax.tree.map(lambda w: w.astype(param_dtype), params),
        strategy=strategy,
        capacity_factor=4.0,
    )
    chex.assert_type(out.y, jnp.bfloat16)
    chex.assert_shape(out.y, x.shape)
    full = run_moe(x, routing, params, strategy=strategy, capacity_factor=4.0)
    np.testing.assert_allclose(out.y.astype(jnp.float32), full.y, rtol=5e-2, atol=5e-2)


def test_moe_ffn_returns_pytree_output() -> None:
    x, routing, params = problem(4, 2, 1, 3, 3)
    out = run_moe(x, routing, params, strategy="dropless")
    assert isinstance(out, MoEOutput)
    assert len(jax.tree.leaves(out)) == 2


@pytest.mark.parametrize("strategy", ONE_DEVICE)
def test_strategies_reject_mismatched_shapes(strategy: str) -> None:
    x, routing, params = problem(4, 2, 1, 3, 5)
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


def test_shared_experts_add_to_every_strategy() -> None:
    rng = np.random.default_rng(5)
    x = draw_normal(rng, 12, 6)
    shared = swiglu_params(rng, 2, 6, 10)
    x64 = np.asarray(x, np.float64)
    expected = swiglu64(x64, shared, 0) + swiglu64(x64, shared, 1)
    routing = jax.jit(softmax_top_k, static_argnames="top_k")(draw_normal(rng, 12, 4), top_k=2)
    params = swiglu_params(rng, 4, 6, 8)
    for strategy in ONE_DEVICE:
        routed = run_moe(x, routing, params, strategy=strategy, capacity_factor=2.0)
        both = run_moe(
            x, routing, params, strategy=strategy, capacity_factor=2.0, shared_params=shared
        )
        np.testing.assert_allclose(both.y, np.asarray(routed.y) + expected, rtol=1e-5, atol=1e-5)


# --- the registry and the contract ------------------------------------------------------------


def test_unknown_strategy_lists_the_registered_ones() -> None:
    x, routing, params = problem(4, 2, 1, 3, 3)
    with pytest.raises(ValueError, match=r"dispatch: got 'dense'; allowed: dropless, capacity, "):
        moe_ffn(x, routing, params, strategy="dense")
    with pytest.raises(ValueError, match=r"dispatch: got 'nope'; allowed: .*expert_parallel, llep"):
        moe.get("nope")


def test_options_of_another_strategy_are_refused() -> None:
    x, routing, params = problem(4, 2, 1, 3, 3)
    with pytest.raises(ValueError, match=r"options: got CapacityOptions.*a DroplessOptions"):
        moe_ffn(x, routing, params, strategy="dropless", options=moe.CapacityOptions())


def _dispatch(x, routing, expert_params, *, train, scale):
    return x * scale, jnp.zeros(())


@dataclasses.dataclass(frozen=True)
class _ScaleOptions(DispatchOptions):
    scale: float = 1.0


def _takes_no_scale(x, routing, expert_params, *, train):
    return x, jnp.zeros(())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"needs": ("train", "token_ids")},
            r"needs: got \['token_ids'\]; allowed: names from mesh",
        ),
        ({"options": dict}, r"options: got <class 'dict'>; allowed: a DispatchOptions subclass"),
        ({"expert_shards": "many"}, r"expert_shards: got 'many'; allowed: one, several, any"),
        # The function takes every declared need and every option field as a keyword.
        ({"needs": ("train", "mesh")}, r"dispatch: got \['mesh'\]; allowed: a function taking"),
        ({"dispatch": _takes_no_scale}, r"dispatch: got \['scale'\]; allowed: a function taking"),
    ],
)
def test_spec_is_checked_at_registration(changes: dict, message: str) -> None:
    fields = {"name": "bad", "dispatch": _dispatch, "options": _ScaleOptions, "needs": ("train",)}
    DispatchSpec(**fields)  # the unchanged spec is fine
    with pytest.raises(ValueError, match=message):
        DispatchSpec(**{**fields, **changes})


def test_a_name_registers_once() -> None:
    spec = DispatchSpec("dropless", _dispatch, _ScaleOptions, needs=("train",))
    with pytest.raises(ValueError, match="dispatch: got 'dropless'; allowed: a name not already"):
        moe.register(spec)
    assert moe.get("dropless").options is moe.DroplessOptions


@pytest.mark.parametrize(
    ("strategy", "shards", "fits"),
    [
        ("dropless", 1, True),
        ("dropless", 4, False),
        ("capacity", 1, True),
        ("capacity", 4, True),
        ("expert_parallel", 1, False),
        ("expert_parallel", 4, True),
        ("llep", 1, False),
        ("llep", 2, True),
    ],
)
def test_expert_parallelism_is_named_not_inferred(strategy: str, shards: int, fits: bool) -> None:
    spec = moe.get(strategy)
    assert spec.fits_expert_shards(shards) == fits
    mesh = sharding.make_mesh({"data": 8 // shards, "fsdp": 1, "expert": shards, "tensor": 1})
    if fits:
        spec.check_mesh(mesh.abstract_mesh)
        return
    wanted = "expert_parallel, llep" if shards > 1 else "dropless, capacity"
    with pytest.raises(ValueError, match=f"mesh expert axis: got {shards}; .* one of: .*{wanted}"):
        spec.check_mesh(mesh.abstract_mesh)


def test_expert_parallel_refuses_one_device() -> None:
    x, routing, params = problem(4, 2, 1, 3, 3)
    with pytest.raises(ValueError, match="mesh expert axis: got 1; allowed: > 1 for dispatch"):
        moe_ffn(x, routing, params, strategy="expert_parallel")
