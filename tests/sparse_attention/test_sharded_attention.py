"""SparseAttention under a device mesh: the kernel runs inside `jax.shard_map`, per batch and
head shard, and the layer's output and gradients equal the single-device ones (issue 13)."""

import functools
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import kernels_pallas
from moejax.parallel.sharding import logical_axes, logical_to_mesh, make_mesh, tree_shardings
from moejax.sparse_attention import AttentionConfig, SparseAttention
from moejax.sparse_attention.sharded_kernel import attention_spec, block_sparse_attention

D_MODEL, HEADS, KV_HEADS, HEAD_DIM, BASE = 16, 8, 4, 8, 10000.0
BATCH, LENGTH = 8, 32

_of = AttentionConfig.of
OPTIONS = {
    "dense": _of("dense", block_size=8),
    "local": _of("local", options={"window": 12}, block_size=8),
    "global_local": _of("global_local", options={"window": 8, "num_global": 8}, block_size=8),
    "moba": _of("moba", options={"top_k": 1}, block_size=8, key_conv_width=2),
    "bilevel": _of("bilevel", options={"top_k": 1}, block_size=8),
    "routing": _of("routing", options={"top_k": 1, "window": 8, "num_clusters": 2}, block_size=8),
    "dynamic_mask": _of("dynamic_mask", options={"top_k": 1, "window": 8}, block_size=8),
    "flux": _of("moba", options={"top_k": 1}, block_size=8, flux_router=True),
}

# (data, fsdp, expert, tensor). The last splits no heads: 8 does not divide KV_HEADS.
MESHES = {
    "data8": (8, 1, 1, 1),
    "batch_axes_2x2x2": (2, 2, 2, 1),
    "data2_tensor4": (2, 1, 1, 4),
    "data2_fsdp2_tensor2": (2, 2, 1, 2),
    "tensor8_heads_whole": (1, 1, 1, 8),
}


def _mesh(name: str) -> jax.sharding.Mesh:
    sizes = dict(zip(("data", "fsdp", "expert", "tensor"), MESHES[name], strict=True))
    return make_mesh(sizes)


def _layer(options: AttentionConfig) -> SparseAttention:
    return SparseAttention(
        D_MODEL,
        HEADS,
        KV_HEADS,
        HEAD_DIM,
        BASE,
        attention=options,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs=nnx.Rngs(0),
    )


def _value_and_grads(options: AttentionConfig, length: int = LENGTH):
    """A function of (params, x) giving the layer's output and the gradients of a random
    projection of it (plus its metrics) w.r.t. params and x; and its params and inputs."""
    graphdef, params, rest = nnx.split(_layer(options), nnx.Param, ...)
    x = jax.random.normal(jax.random.key(1), (BATCH, length, D_MODEL))
    cotangent = jax.random.normal(jax.random.key(2), (BATCH, length, D_MODEL))

    rest = nnx.to_pure_dict(rest)

    def loss(params, x):
        # Merged from traced state: the routing kind's centroid update mutates it in this trace.
        y, metrics = nnx.merge(graphdef, params, nnx.State(rest))(x, train=True)
        return jnp.sum(y * cotangent) + sum(metrics.values()), y

    def value_and_grads(params, x):
        (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return y, grads

    return value_and_grads, nnx.to_pure_dict(params), x


def _param_shardings(mesh: jax.sharding.Mesh, options: AttentionConfig):
    """Params by their logical axes, as the train step places them; replicated where the mesh
    does not divide them (the tensor-8 mesh, which config validation would reject)."""
    params = nnx.to_pure_dict(_layer_params(options))
    by_rules = tree_shardings(mesh, logical_axes(_layer_params(options)))

    def fit(value, sharding):
        for size, axes in zip(value.shape, sharding.spec, strict=False):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
            if size % math.prod(mesh.shape[axis] for axis in axes):
                return NamedSharding(mesh, PartitionSpec())
        return sharding

    return jax.tree.map(fit, params, by_rules)


def _sharded(options: AttentionConfig, mesh: jax.sharding.Mesh):
    """The same values computed under `mesh`: x split over the batch axes, params by their
    logical axes."""
    value_and_grads, params, x = _value_and_grads(options)
    param_shardings = _param_shardings(mesh, options)
    x_sharding = NamedSharding(mesh, logical_to_mesh(("batch", "length", "activation_embed")))
    with jax.set_mesh(mesh):
        params = jax.device_put(params, param_shardings)
        x = jax.device_put(x, x_sharding)
        return jax.jit(lambda p, x: value_and_grads(nnx.State(p), x))(params, x)


def _layer_params(options: AttentionConfig) -> nnx.State:
    return nnx.state(_layer(options), nnx.Param)


@functools.cache
def _unsharded(options: AttentionConfig):
    value_and_grads, params, x = _value_and_grads(options)
    return jax.jit(lambda p, x: value_and_grads(nnx.State(p), x))(params, x)


def _assert_trees_close(actual, expected):
    flat_actual, tree = jax.tree.flatten(nnx.to_pure_dict(nnx.State(actual)))
    flat_expected, expected_tree = jax.tree.flatten(nnx.to_pure_dict(nnx.State(expected)))
    assert tree == expected_tree
    for got, want in zip(flat_actual, flat_expected, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-5)


def _check_matches_single_device(options: AttentionConfig, mesh_name: str):
    y, (grad_params, grad_x) = _sharded(options, _mesh(mesh_name))
    y_ref, (grad_params_ref, grad_x_ref) = _unsharded(options)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(np.asarray(grad_x), np.asarray(grad_x_ref), rtol=1e-5, atol=2e-5)
    _assert_trees_close(grad_params, grad_params_ref)
    assert float(jnp.abs(grad_x_ref).sum()) > 0


def _shard_map_eqn(jaxpr):
    (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]
    return eqn


@pytest.mark.parametrize("kind", list(OPTIONS))
def test_every_kind_matches_single_device_on_batch_and_tensor_mesh(kind):
    _check_matches_single_device(OPTIONS[kind], "data2_tensor4")


@pytest.mark.parametrize(
    ("kind", "mesh_name"),
    [
        ("dense", "data8"),
        ("dense", "tensor8_heads_whole"),
        ("dynamic_mask", "batch_axes_2x2x2"),
        ("dynamic_mask", "data2_fsdp2_tensor2"),
    ],
)
def test_static_and_routed_masks_match_single_device_on_other_meshes(kind, mesh_name):
    # dense: a host mask closed over; dynamic_mask: a traced per-head mask and the key bias.
    _check_matches_single_device(OPTIONS[kind], mesh_name)


@pytest.mark.parametrize("kind", ["dense", "moba"])  # a host mask closed over; a traced one
def test_pallas_kernel_in_interpret_mode_matches_single_device(kind):
    kind_options = {"top_k": 1} if kind == "moba" else {}
    options = _of(kind, options=kind_options, block_size=8, impl="interpret")
    _check_matches_single_device(options, "data2_fsdp2_tensor2")


@pytest.mark.parametrize(
    ("mesh_name", "local_batch", "local_heads"),
    [
        ("data8", 1, HEADS),
        ("batch_axes_2x2x2", 1, HEADS),
        ("data2_tensor4", BATCH // 2, HEADS // 4),
        ("tensor8_heads_whole", BATCH, HEADS),
    ],
)
def test_kernel_sees_one_shard_of_batch_and_heads(mesh_name, local_batch, local_heads):
    """The shard_map body gets per-device q and mask blocks, not replicated whole arrays."""
    layer = _layer(OPTIONS["moba"])
    x = jnp.zeros((BATCH, LENGTH, D_MODEL))
    with jax.set_mesh(_mesh(mesh_name)):
        jaxpr = jax.make_jaxpr(lambda x: layer(x, train=False)[0])(x)
    q, k, v, block_mask = _shard_map_eqn(jaxpr).params["jaxpr"].invars
    local_kv_heads = local_heads * KV_HEADS // HEADS
    assert q.aval.shape == (local_batch, LENGTH, local_heads, HEAD_DIM)
    assert k.aval.shape == v.aval.shape == (local_batch, LENGTH, local_kv_heads, HEAD_DIM)
    assert block_mask.aval.shape[:2] == (local_batch, local_heads)


def test_attention_spec_follows_the_logical_rules():
    mesh = _mesh("data2_tensor4").abstract_mesh
    batch_axes = ("data", "fsdp", "expert")
    assert attention_spec(mesh, 8, 8, 4) == PartitionSpec(batch_axes, None, "tensor", None)
    # kv heads 2 on 4 tensor shards would break the query-head -> kv-head grouping.
    assert attention_spec(mesh, 8, 8, 2) == PartitionSpec(batch_axes, None, None, None)
    assert attention_spec(mesh, 1, 8, 4) == PartitionSpec(None, None, "tensor", None)


def _kernel_operands():
    keys = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(keys[0], (BATCH, LENGTH, HEADS, HEAD_DIM))
    k, v = jax.random.normal(keys[1], (2, BATCH, LENGTH, KV_HEADS, HEAD_DIM))
    blocks = LENGTH // 8
    # A host mask that differs per sequence and head: a sharded operand, not closed over.
    mask = np.random.default_rng(0).random((BATCH, HEADS, blocks, blocks)) < 0.5
    return q, k, v, mask | np.eye(blocks, dtype=bool)


KERNEL_ARGS = {"block_q": 8, "block_kv": 8, "causal": True, "impl": "xla"}


def test_per_sequence_host_mask_is_split_with_its_rows():
    q, k, v, mask = _kernel_operands()
    expected = jax.jit(functools.partial(kernels_pallas.block_sparse_attention, **KERNEL_ARGS))(
        q, k, v, mask
    )
    with jax.set_mesh(_mesh("data2_tensor4")):
        out = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, mask, **KERNEL_ARGS))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_inside_an_outer_shard_map_the_kernel_splits_over_the_remaining_axes():
    q, k, v, mask = _kernel_operands()
    expected = jax.jit(functools.partial(kernels_pallas.block_sparse_attention, **KERNEL_ARGS))(
        q, k, v, mask
    )
    outer = PartitionSpec("expert")
    attend = functools.partial(block_sparse_attention, **KERNEL_ARGS)
    with jax.set_mesh(_mesh("batch_axes_2x2x2")):
        nested = jax.shard_map(attend, in_specs=outer, out_specs=outer, axis_names={"expert"})
        out = jax.jit(nested)(q, k, v, mask)
        outer_body = _shard_map_eqn(jax.make_jaxpr(nested)(q, k, v, mask)).params["jaxpr"]
    # expert is manual already; data and fsdp split the remaining 4 rows into 1 per device.
    inner_q = _shard_map_eqn(outer_body).params["jaxpr"].invars[0]
    assert inner_q.aval.shape == (1, LENGTH, HEADS, HEAD_DIM)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_single_device_calls_the_kernel_directly():
    layer = _layer(OPTIONS["moba"])
    jaxpr = jax.make_jaxpr(lambda x: layer(x, train=False)[0])(jnp.zeros((2, LENGTH, D_MODEL)))
    assert "shard_map" not in {e.primitive.name for e in jaxpr.eqns}


def _tpu_devices():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed")
    from jax.experimental import topologies

    # As tests/aot/conftest.py: no metadata-server query, no machine-wide libtpu lock (other
    # processes compile for topologies at the same time).
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    return topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2").devices


# The persistent cache stores the TPU executable but cannot read it back without a TPU client.
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry")
def test_moba_forward_and_backward_compile_for_a_tpu_mesh():
    """Mosaic kernels cannot be partitioned by the compiler: without the shard_map this fails
    with "Mosaic kernels cannot be automatically partitioned"."""
    mesh = make_mesh({"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}, _tpu_devices())
    options = _of("moba", options={"top_k": 1}, block_size=128, impl="auto")
    value_and_grads, params, _ = _value_and_grads(options, length=512)
    param_shardings = tree_shardings(mesh, logical_axes(_layer_params(options)))
    batch = NamedSharding(mesh, logical_to_mesh(("batch", "length", "activation_embed")))
    with jax.set_mesh(mesh):
        params_struct = jax.tree.map(
            lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
            params,
            param_shardings,
        )
        x_struct = jax.ShapeDtypeStruct((BATCH, 512, D_MODEL), jnp.float32, sharding=batch)
        step = jax.jit(lambda p, x: value_and_grads(nnx.State(p), x))
        compiled = step.lower(params_struct, x_struct).compile()
    hlo = compiled.as_text()
    assert "tpu_custom_call" in hlo
    # Each device runs the kernel on its own sequence: q blocks [1, heads, 512, head_dim].
    assert f"f32[1,{HEADS},512,{HEAD_DIM}]" in hlo
