"""Our Mosaic kernels inside a user's `jax.shard_map` that checks varying axes (the default).

A `pallas_call` in such a shard_map must say how its outputs vary over the manual axes, and a
`custom_vjp` must return cotangents varying like its inputs; compiled for an 8-chip TPU
topology, forward and backward.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

pytest.importorskip("libtpu", reason="compiling for a TPU topology needs libtpu ([tpu] extra)")

from kernels_pallas import block_sparse_attention, gmm  # noqa: E402
from moejax.parallel import aot, sharding  # noqa: E402

BATCH, LENGTH, HEADS, HEAD_DIM, BLOCK = 8, 1024, 4, 128, 128


def _data_mesh():
    return sharding.make_mesh(
        {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}, aot.topology_devices("v5p:2x2x2")
    )


def test_block_sparse_attention_in_a_checking_shard_map():
    mesh = _data_mesh()
    blocks = LENGTH // BLOCK
    mask = np.tril(np.ones((1, 1, blocks, blocks), bool))

    def attention(q, k, v):
        out = block_sparse_attention(
            q, k, v, mask, block_q=BLOCK, block_kv=BLOCK, causal=True, impl="pallas"
        )
        return jnp.sum(out.astype(jnp.float32) ** 2)

    def per_device(q, k, v):
        return jax.grad(attention, argnums=(0, 1, 2))(q, k, v)

    spec = P("data")
    run = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec,) * 3))
    shape = jax.ShapeDtypeStruct(
        (BATCH, LENGTH, HEADS, HEAD_DIM), jnp.bfloat16, sharding=NamedSharding(mesh, spec)
    )
    with jax.set_mesh(mesh):
        text = run.lower(shape, shape, shape).compile().as_text()
    # Forward, and the dq and dk/dv kernels of the backward.
    assert text.count('custom_call_target="tpu_custom_call"') >= 3


def test_gmm_with_replicated_weights_in_a_checking_shard_map():
    """lhs split over devices, rhs the same on each: rhs's gradient is summed over them."""
    mesh = _data_mesh()

    def per_device(lhs, rhs, sizes):
        loss = lambda lhs, rhs: jnp.sum(gmm(lhs, rhs, sizes, impl="pallas").astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 1))(lhs, rhs)

    run = jax.jit(
        jax.shard_map(
            per_device, mesh=mesh, in_specs=(P("data"), P(), P("data")), out_specs=(P("data"), P())
        )
    )
    lhs = jax.ShapeDtypeStruct(
        (8 * 512, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P("data"))
    )
    rhs = jax.ShapeDtypeStruct((4, 256, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    sizes = jax.ShapeDtypeStruct((8 * 4,), jnp.int32, sharding=NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh):
        text = run.lower(lhs, rhs, sizes).compile().as_text()
    assert 'custom_call_target="tpu_custom_call"' in text
    assert "all-reduce" in text, "rhs's gradient must be summed over the data axis"
