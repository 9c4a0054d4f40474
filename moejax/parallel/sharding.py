"""Device mesh, logical axis names and the one rules table that maps them onto the mesh.

Parameters are created with logical axis names (`"embed"`, `"expert"`, ...) through `param`.
`LOGICAL_RULES` maps every logical name to mesh axes, so expert parallelism, FSDP and tensor
parallelism are changes of mesh shape, not of code.

A user's own mesh: rules given with Flax's `nnx.logical_axis_rules` replace moejax's for the
names they list (`with nnx.logical_axis_rules([("expert", "model")]):`), and a mesh axis that
the mesh lacks is left out of a spec (that dimension is replicated over the mesh instead), so
moejax's layers run inside a `("data", "model")` mesh as they do inside moejax's own.

The mesh uses `AxisType.Auto` on purpose: the train step is compiled with explicit
`in_shardings` / `out_shardings` and activations get `with_sharding_constraint` at layer
boundaries, and the compiler (GSPMD / Shardy) propagates the rest. Explicit-mode sharding
types every intermediate, which `jax.lax.ragged_dot` and the Pallas kernels do not support on
every backend yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

# The device-mesh axes, in mesh order; `moejax.config.MeshConfig` sizes them.
MESH_AXES = ("data", "fsdp", "expert", "tensor")

LogicalAxes = tuple[str | None, ...]
MeshAxes = str | tuple[str, ...] | None

# Logical name -> mesh axis (or tuple of axes, or None for replicated).
LOGICAL_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    # Activations: batch-sharded; their feature axes stay whole except heads and vocab.
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_vocab", "tensor"),
)


def param(value: jax.Array, names: LogicalAxes) -> nnx.Param:
    """A parameter annotated with one logical axis name per dimension.

    Eager sharding is off: modules are built abstractly (`nnx.eval_shape`) or inside a jit
    whose `out_shardings` come from `LOGICAL_RULES`, never under an ambient mesh.
    """
    if len(names) != value.ndim:
        raise ValueError(f"param: {len(names)} axis names {names} for a {value.ndim}-d value")
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def axis_rules() -> dict[str, MeshAxes]:
    """The rules in force: `LOGICAL_RULES`, except for the logical names that the ambient
    `flax.nnx.logical_axis_rules` context maps (its first rule for a name wins, as in Flax)."""
    rules = dict(LOGICAL_RULES)
    user: dict[str, MeshAxes] = {}
    for name, axes in spmd.get_logical_axis_rules():
        user.setdefault(name, axes)
    return rules | user


def logical_to_mesh(
    names: Sequence[str | None], mesh: Mesh | jax.sharding.AbstractMesh | None = None
) -> PartitionSpec:
    """PartitionSpec over mesh axes for a tuple of logical axis names, by `axis_rules()`.

    Against `mesh` (default: the ambient mesh, if any) a mesh axis the mesh lacks is left out,
    and so is one an earlier dimension already uses (a rule table that maps two of an array's
    names to one axis shards the first); without a mesh the rules' axes are returned as they are.
    """
    rules = axis_rules()
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    present = None if mesh.empty else set(mesh.axis_names)
    used: set[str] = set()
    axes = []
    for name in names:
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule; known: {', '.join(rules)}")
        entry = None if name is None else rules[name]
        if present is not None and entry is not None:
            kept = tuple(
                axis
                for axis in ((entry,) if isinstance(entry, str) else entry)
                if axis in present and axis not in used
            )
            used.update(kept)
            entry = kept[0] if len(kept) == 1 else (kept or None)
        axes.append(entry)
    return PartitionSpec(*axes)


def make_mesh(axis_sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over (data, fsdp, expert, tensor) with the given resolved sizes."""
    shape = tuple(axis_sizes[axis] for axis in MESH_AXES)
    devices = list(jax.devices() if devices is None else devices)
    if int(np.prod(shape)) != len(devices):
        sizes = dict(zip(MESH_AXES, shape, strict=True))
        raise ValueError(f"mesh shape {sizes} needs {np.prod(shape)} devices, got {len(devices)}")
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except NotImplementedError:
        # A mesh axis that is no product of whole torus axes (expert=8 on a v5p 4x4x4): split
        # physical axes, as jax.make_mesh itself does on v5e only.
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, MESH_AXES, axis_types=axis_types)


def logical_axes(model_state: nnx.State) -> dict[str, Any]:
    """Pure dict (shaped like the params) of each parameter's logical axis names."""
    # Flax would rename the names by its ambient rules; the names are wanted here.
    with nnx.logical_axis_rules(()):
        specs = nnx.to_pure_dict(nnx.get_partition_spec(model_state))
    return jax.tree.map(tuple, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def tree_shardings(mesh: Mesh, axes_tree: Any) -> Any:
    """NamedShardings for a tree of logical-axis tuples, by `axis_rules()`, on `mesh`."""
    return jax.tree.map(
        lambda names: NamedSharding(mesh, logical_to_mesh(names, mesh)),
        axes_tree,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def like_params(tree: Any, params_struct: Any, param_shardings: Any, default: Any) -> Any:
    """Shardings for an optimizer-state tree: every sub-tree shaped like the params gets the
    param shardings (Adam's moments, masks, ...); every other leaf gets `default`.

    Optax states are nested named tuples whose moment fields mirror the params tree, so
    matching on tree structure finds them whatever the optimizer chain looks like.
    """
    target = jax.tree.structure(params_struct)

    def is_params_like(node: Any) -> bool:
        return jax.tree.structure(node) == target

    def assign(node: Any) -> Any:
        if is_params_like(node):
            return param_shardings
        return default

    return jax.tree.map(assign, tree, is_leaf=is_params_like)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a `[batch, length]` token array."""
    return NamedSharding(mesh, logical_to_mesh(("batch", "length")))


def process_batch_block(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
    """(block index, block count): this process's devices hold rows `[index * size, (index + 1)
    * size)` of a `[global_batch_size, length]` batch sharded by `batch_sharding(mesh)`, with
    `size = global_batch_size // count`. What the input pipeline must feed this process.

    The mesh decides which rows land on which process, and it need not follow the process index
    (a TPU mesh follows the torus); devices that replicate the batch (the tensor axis) make
    processes share a block. A process whose rows are not one aligned block cannot be fed from
    contiguous rows, which is a ValueError.
    """
    indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch_size, 1))
    rows = sorted({index[0].indices(global_batch_size)[:2] for index in indices.values()})
    start, stop = rows[0][0], rows[-1][1]
    contiguous = all(a[1] == b[0] for a, b in zip(rows, rows[1:], strict=False))
    size = stop - start
    if not contiguous or start % size or global_batch_size % size:
        raise ValueError(
            f"mesh {dict(mesh.shape)}: process {jax.process_index()}'s devices hold batch rows "
            f"{rows}, not one aligned block of the {global_batch_size}-row batch; order the "
            "devices so that each process's devices are consecutive along the batch axes"
        )
    return start // size, global_batch_size // size


def to_host(tree: Any) -> Any:
    """`tree`'s arrays as numpy arrays on this process, whole, even where they are sharded over
    devices of other processes (there `jax.device_get` refuses: it reads only local shards)."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def constrain(x: jax.Array, names: LogicalAxes) -> jax.Array:
    """`with_sharding_constraint` by logical names (`logical_to_mesh` against the ambient mesh);
    a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_mesh(names))


def kernel_mesh() -> jax.sharding.AbstractMesh | None:
    """The ambient mesh when it spans more than one device, else None.

    The compiler cannot partition a `pallas_call` (Mosaic and Triton kernels are opaque to it),
    so a kernel in a sharded step runs inside `jax.shard_map` over this mesh; with None the
    kernel is called directly. Axes already manual (inside another shard_map) do not count.
    A mesh without moejax's axes (`MESH_AXES`), a user's `("data", "model")`, is None too: the
    shard_map bodies exchange tokens over moejax's axis names, so there the compiler
    partitions around the kernels instead.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return None
    free = [size for name, size in mesh.shape.items() if name not in mesh.manual_axes]
    return mesh if int(np.prod(free)) > 1 else None
