"""What the expert-parallel tests share: meshes with the train step's shardings, and
`jax.lax.ragged_all_to_all` emulated with all_gathers (XLA:CPU has no ragged all-to-all; tests
monkeypatch it in to check the offsets and sizes of the TPU/GPU exchange)."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from moejax.parallel import sharding

WEIGHT_AXES = {
    "w_gate": ("expert", "embed", "expert_mlp"),
    "w_up": ("expert", "embed", "expert_mlp"),
    "w_down": ("expert", "expert_mlp", "embed"),
}


def mesh_of(shape: tuple[int, int, int, int]) -> jax.sharding.Mesh:
    """The mesh of (data, fsdp, expert, tensor) sizes over this process's devices."""
    return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape, strict=True)))


def step_shardings(mesh: jax.sharding.Mesh) -> tuple[NamedSharding, dict[str, NamedSharding]]:
    """The shardings of tokens ([tokens, ...], batch-sharded) and of the expert weights, as the
    train step lays them out."""
    tokens = NamedSharding(mesh, sharding.logical_to_mesh(("batch", None)))
    weights = {
        name: NamedSharding(mesh, sharding.logical_to_mesh(axes))
        for name, axes in WEIGHT_AXES.items()
    }
    return tokens, weights


def emulated_ragged_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
    """`jax.lax.ragged_all_to_all` from its documented contract, with all_gathers (XLA:CPU has
    no ragged all-to-all): source s writes operand_s[input_offsets_s[r]:][:send_sizes_s[r]] at
    output_r[output_offsets_s[r]:]; this device is r."""
    me = jax.lax.axis_index(axis_name)
    operands = jax.lax.all_gather(operand, axis_name)  # [shards, m, d]
    starts = jax.lax.all_gather(input_offsets, axis_name)[:, me]  # [shards]
    sizes = jax.lax.all_gather(send_sizes, axis_name)[:, me]
    places = jax.lax.all_gather(output_offsets, axis_name)[:, me]
    np.testing.assert_equal(recv_sizes.shape, sizes.shape)
    position = jnp.arange(output.shape[0])
    for source in range(operands.shape[0]):
        inside = (position >= places[source]) & (position < places[source] + sizes[source])
        row = jnp.clip(starts[source] + position - places[source], 0, operand.shape[0] - 1)
        output = jnp.where(inside[:, None], operands[source][row], output)
    return output
