"""moejax's layers inside a user's mesh with other axis names (`("data", "model")` over the 8
fake CPU devices): the user's `nnx.logical_axis_rules` place the experts, moejax's table fills
in the rest, and mesh axes the user's mesh lacks are left out instead of failing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from moejax.models.moe_layer import MoELayer
from moejax.parallel import sharding

D_MODEL, D_FF, EXPERTS, TOP_K = 8, 16, 4, 2
USER_RULES = (("expert", "model"), ("batch", "data"))


@pytest.fixture(scope="module")
def mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)


def test_logical_to_mesh_follows_user_rules_and_leaves_out_absent_axes(mesh) -> None:
    names = ("expert", "embed", "expert_mlp")
    assert sharding.logical_to_mesh(names) == P("expert", "fsdp", "tensor")
    assert sharding.logical_to_mesh(names, mesh) == P(None, None, None)
    with nnx.logical_axis_rules(USER_RULES):
        assert sharding.logical_to_mesh(names) == P("model", "fsdp", "tensor")
        assert sharding.logical_to_mesh(names, mesh) == P("model", None, None)
        # moejax's batch rule spans three axes; the user's mesh keeps "data" only.
        assert sharding.logical_to_mesh(("batch", "length"), mesh) == P("data", None)
    with nnx.logical_axis_rules((("expert", "model"), ("embed", "model"))):
        # One mesh axis shards one dimension of an array: the first name that asks gets it.
        assert sharding.logical_to_mesh(names, mesh) == P("model", None, None)


def _loss(layer: MoELayer, x: jax.Array) -> jax.Array:
    y, aux, _ = layer(x)
    return jnp.mean(y**2) + aux["aux_loss"]


def test_moe_layer_trains_in_a_user_mesh_with_experts_sharded_by_user_rules(mesh) -> None:
    x = jax.random.normal(jax.random.key(1), (4, 6, D_MODEL))
    reference = MoELayer(D_MODEL, D_FF, EXPERTS, TOP_K, rngs=nnx.Rngs(0))
    want_loss, want_grads = jax.jit(jax.value_and_grad(_loss))(reference, x)

    graphdef, state = nnx.split(MoELayer(D_MODEL, D_FF, EXPERTS, TOP_K, rngs=nnx.Rngs(0)))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(USER_RULES):
        shardings = sharding.tree_shardings(mesh, sharding.logical_axes(state))
        state = jax.device_put(nnx.to_pure_dict(state), shardings)
        assert state["w_gate"].sharding.spec == P("model", None, None)
        assert state["w_down"].sharding.spec == P("model", None, None)
        # Each of the 4 "model" shards holds one expert.
        assert {shard.data.shape[0] for shard in state["w_gate"].addressable_shards} == {1}

        @jax.jit
        def loss_and_grads(state, x):
            def loss(state):
                return _loss(nnx.merge(graphdef, nnx.State(state), copy=True), x)

            return jax.value_and_grad(loss)(state)

        x = jax.device_put(x, sharding.tree_shardings(mesh, ("batch", "length", "embed")))
        loss, grads = loss_and_grads(state, x)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(grads["w_gate"], want_grads.w_gate[...], rtol=1e-4, atol=1e-6)


def test_moe_layer_runs_in_a_user_mesh_without_rules(mesh) -> None:
    """The report that started this: moejax's names absent from the mesh used to fail with
    `Resource axis: expert ... is not found in mesh`."""
    layer = MoELayer(D_MODEL, D_FF, EXPERTS, TOP_K, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 6, D_MODEL))
    forward = nnx.jit(lambda layer, x: layer(x)[0])
    with jax.set_mesh(mesh):
        y = forward(layer, x)
    np.testing.assert_allclose(y, forward(layer, x), rtol=1e-5, atol=1e-6)
