"""Dropless MoE over a device mesh equals the one-device dispatch: "dropless" over the data axes,
"expert_parallel" (`moejax.moe.expert_parallel`, `moejax.moe._sharded`) over expert shards.

Eight fake CPU devices (tests/conftest.py). The reference is "dropless" traced with no mesh,
itself checked against float64 references in tests/moe/test_dispatch.py.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import pytest
from expert_mesh import emulated_ragged_all_to_all, mesh_of, step_shardings

from moejax import moe
from moejax.moe import ExpertParallelOptions, expert_parallel
from moejax.parallel import hlo, sharding
from moejax.routers.base import Routing

NUM_EXPERTS, D_MODEL, D_FF, TOKENS, TOP_K = 8, 16, 32, 64, 2
# (data, fsdp, expert, tensor): "dropless" over data shards; one expert group of 8 shards; data
# and fsdp groups, the expert weights gathered over fsdp at the shard_map boundary; fsdp groups
# with tensor parallelism.
MESHES = [(8, 1, 1, 1), (1, 1, 8, 1), (2, 2, 2, 1), (1, 2, 2, 2)]


def _routing(kind: str) -> tuple[jax.Array, jax.Array]:
    """expert_index and combine_weights [tokens, top_k] of a routing `kind`:

    "balanced": every expert gets the same number of assignments;
    "skewed": 7 of 8 first choices go to expert 3, and every second choice to the experts of one
      shard or another at random: one shard receives most of every device's rows;
    "one_expert": every first choice is expert 0 (one shard receives every first choice).
    """
    tokens = jnp.arange(TOKENS)
    if kind == "balanced":
        first = tokens % NUM_EXPERTS
        second = (tokens + 3) % NUM_EXPERTS
    elif kind == "skewed":
        first = jnp.where(tokens % 8 == 0, tokens % NUM_EXPERTS, 3)
        second = jax.random.randint(jax.random.key(5), (TOKENS,), 0, NUM_EXPERTS)
        second = jnp.where(second == first, (second + 1) % NUM_EXPERTS, second)
    else:
        first = jnp.zeros_like(tokens)
        second = 1 + tokens % (NUM_EXPERTS - 1)
    index = jnp.stack([first, second], axis=1).astype(jnp.int32)
    weights = jax.nn.softmax(jax.random.normal(jax.random.key(3), (TOKENS, TOP_K)), axis=-1)
    return index, weights


def _inputs():
    params = moe.init_expert_params(jax.random.key(0), NUM_EXPERTS, D_MODEL, D_FF)
    x = jax.random.normal(jax.random.key(1), (TOKENS, D_MODEL))
    return x, params


def _strategy(mesh, **options) -> tuple[str, moe.DispatchOptions | None]:
    """The strategy a mesh needs: "expert_parallel" with `options` over expert shards, else
    "dropless" (inside a shard_map over the data axes under a mesh)."""
    if mesh is not None and mesh.shape["expert"] > 1:
        return "expert_parallel", ExpertParallelOptions(**options)
    return "dropless", None


def _loss(x, params, weights, index, **options):
    """A scalar that weighs every output element differently, and the output."""
    routing = Routing(expert_index=index, combine_weights=weights, router_probs=None, aux_losses={})
    mesh = sharding.kernel_mesh()
    strategy, chosen = _strategy(mesh, **options)
    y = moe.moe_ffn(x, routing, params, strategy=strategy, options=chosen, mesh=mesh).y
    probe = jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))
    return jnp.sum(y * probe), y


_value_and_grads = jax.value_and_grad(_loss, argnums=(0, 1, 2), has_aux=True)
_reference = jax.jit(_value_and_grads)


@functools.cache
def _jitted(shape, **dispatch):
    """`_value_and_grads` with `dispatch` options, jitted with the step's shardings under a mesh
    of `shape`; and the mesh. One per (mesh, options), traced and compiled by the first test that
    runs it (a ragged exchange's only ever by the tests that emulate ragged_all_to_all)."""
    mesh = mesh_of(shape)
    tokens, weight_shardings = step_shardings(mesh)
    fn = jax.jit(
        functools.partial(_value_and_grads, **dispatch),
        in_shardings=(tokens, weight_shardings, tokens, tokens),
    )
    return fn, mesh


def _on_mesh(shape, x, params, weights, index, **dispatch):
    """(value, y), grads of `_loss` jitted under a mesh of `shape` with the step's shardings;
    and the compiled HLO text."""
    fn, mesh = _jitted(shape, **dispatch)
    with jax.set_mesh(mesh):
        result = fn(x, params, weights, index)
        text = fn.lower(x, params, weights, index).compile().as_text()
    return result, text


def _assert_close(actual, expected):
    chex.assert_trees_all_close(actual, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["balanced", "skewed"])
def test_sharded_dropless_equals_one_device(shape, kind):
    x, params = _inputs()
    index, weights = _routing(kind)
    expected = _reference(x, params, weights, index)
    actual, text = _on_mesh(shape, x, params, weights, index)
    _assert_close(actual, expected)
    has_all_to_all = "all-to-all" in text
    assert has_all_to_all == (shape[2] > 1), "an all-to-all exactly when experts are sharded"


def _full_weight_gathers(hlo_text: str) -> list[hlo.Collective]:
    """All-gathers whose result holds every expert's weights ([experts, ...])."""
    found = hlo.collectives(hlo_text)
    return hlo.gathers_of(found, (NUM_EXPERTS, D_MODEL, D_FF)) + hlo.gathers_of(
        found, (NUM_EXPERTS, D_FF, D_MODEL)
    )


# Meshes without tensor parallelism, where a gathered expert weight has the full shape; one with
# fsdp, which gathers the weights' d_model axis but never their experts.
@pytest.mark.parametrize("shape", [(1, 1, 8, 1), (2, 2, 2, 1)])
def test_expert_weights_are_never_gathered(shape):
    x, params = _inputs()
    index, weights = _routing("skewed")
    _, text = _on_mesh(shape, x, params, weights, index)
    assert "all-to-all" in text
    assert _full_weight_gathers(text) == []


def test_full_weight_gather_detector_sees_annotation_only_sharding():
    """The check above can fail: the one-device dropless dispatch traced under the same mesh
    (sharding annotations only, the code before expert parallelism) gathers the full expert
    weights to every device."""
    x, params = _inputs()
    index, weights = _routing("skewed")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "expert": 8, "tensor": 1})

    def annotated_only(x, params, weights, index):
        routing = Routing(index, weights, None, {})
        return moe.dropless_dispatch(x, routing, params)[0]

    tokens, weight_shardings = step_shardings(mesh)
    fn = jax.jit(annotated_only, in_shardings=(tokens, weight_shardings, tokens, tokens))
    with jax.set_mesh(mesh):
        text = fn.lower(x, params, weights, index).compile().as_text()
    assert _full_weight_gathers(text), "annotation-only sharding should gather expert weights"


@pytest.mark.parametrize("shape", [(1, 1, 8, 1), (1, 2, 2, 2)])
@pytest.mark.parametrize("kind", ["skewed", "one_expert"])
def test_ragged_exchange_offsets(shape, kind, monkeypatch):
    """The TPU/GPU exchange's offsets and sizes, run through an emulated ragged_all_to_all."""
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    x, params = _inputs()
    index, weights = _routing(kind)
    expected = _reference(x, params, weights, index)
    actual, _ = _on_mesh(shape, x, params, weights, index, exchange="ragged")
    _assert_close(actual, expected)


def test_padded_exchange_on_every_expert_to_one_shard():
    x, params = _inputs()
    index, weights = _routing("one_expert")
    expected = _reference(x, params, weights, index)
    actual, _ = _on_mesh((1, 1, 8, 1), x, params, weights, index, exchange="padded")
    _assert_close(actual, expected)


def test_auto_exchange_follows_the_mesh_platform():
    assert expert_parallel.resolve_exchange("auto") == "padded"  # CPU, no mesh
    assert expert_parallel.resolve_exchange("ragged") == "ragged"
    with pytest.raises(ValueError, match="exchange: unknown value 'fast'"):
        expert_parallel.resolve_exchange("fast")


def test_experts_not_divisible_by_expert_shards():
    x, params = _inputs()
    index, weights = _routing("balanced")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "expert": 8, "tensor": 1})
    params = {name: value[:6] for name, value in params.items()}
    routing = Routing(index % 6, weights, None, {})
    with (
        jax.set_mesh(mesh),
        pytest.raises(ValueError, match="num_experts: 6 experts cannot be split"),
    ):
        moe.moe_ffn(x, routing, params, strategy="expert_parallel", mesh=mesh.abstract_mesh)


def test_dropless_over_expert_shards_names_expert_parallel():
    """Expert parallelism is stated by the strategy: "dropless" traced under a mesh with expert
    shards is an error that names the strategies that split experts, not a silent switch."""
    x, params = _inputs()
    index, weights = _routing("balanced")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "expert": 4, "tensor": 1})
    with pytest.raises(ValueError, match="mesh expert axis: got 4; .*expert_parallel, llep"):
        moe.moe_ffn(
            x,
            Routing(index, weights, None, {}),
            params,
            strategy="dropless",
            mesh=mesh.abstract_mesh,
        )
