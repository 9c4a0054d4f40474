"""The block-sparse attention kernel run shard by shard over the ambient device mesh.

The compiler cannot partition a `pallas_call` (Mosaic and Triton kernels are opaque to it), so
in a step traced under a mesh of several devices the kernel runs inside `jax.shard_map`: each
device attends its own batch rows and its own contiguous group of query heads, with the kv
heads that group reads. Attention mixes neither batch rows nor heads, so no collective is
needed and the result equals the unsharded call.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

import kernels_pallas
from kernels_pallas.block_sparse_attention import mask_info
from moejax.parallel.sharding import kernel_mesh, logical_to_mesh


def _free_axes(mesh: jax.sharding.AbstractMesh, axes: Any) -> tuple[str, ...]:
    """The axes of one PartitionSpec entry that are not already manual (outer shard_map)."""
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return tuple(axis for axis in axes if axis not in mesh.manual_axes)


def _divides(mesh: jax.sharding.AbstractMesh, axes: tuple[str, ...], *sizes: int) -> bool:
    shards = math.prod(mesh.shape[axis] for axis in axes)
    return all(size % shards == 0 for size in sizes)


def attention_spec(
    mesh: jax.sharding.AbstractMesh, batch: int, heads: int, kv_heads: int
) -> PartitionSpec:
    """The PartitionSpec of q `[batch, length, heads, head_dim]`, of k and v
    `[batch, length, kv_heads, head_dim]` and of the output, from the logical rules: batch over
    the batch axes, heads over "tensor".

    Heads are split only when the tensor size divides both head counts: contiguous shards then
    keep query head h on the shard of its kv head h // (heads // kv_heads). A dimension the
    mesh does not divide stays whole (every device computes it), which is correct but slower;
    config validation keeps the train step off that path.
    """
    batch_axes, _, head_axes, _ = logical_to_mesh(
        ("batch", "length", "activation_heads", "head_dim")
    )
    batch_axes = _free_axes(mesh, batch_axes)
    head_axes = _free_axes(mesh, head_axes)
    batch_axes = batch_axes if _divides(mesh, batch_axes, batch) else ()
    head_axes = head_axes if _divides(mesh, head_axes, heads, kv_heads) else ()
    return PartitionSpec(batch_axes or None, None, head_axes or None, None)


def _mask_spec(block_mask: Any, q_spec: PartitionSpec) -> PartitionSpec:
    """`block_mask [batch or 1, heads or 1, q_blocks, kv_blocks]` split like q on the dims that
    are not broadcast (size 1)."""
    batch, heads = block_mask.shape[:2]
    return PartitionSpec(
        q_spec[0] if batch > 1 else None, q_spec[2] if heads > 1 else None, None, None
    )


def block_sparse_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, block_mask: Any, **kernel_args: Any
) -> jax.Array:
    """`kernels_pallas.block_sparse_attention` with the same arguments, inside `jax.shard_map`
    over `moejax.parallel.sharding.kernel_mesh()` when there is one, called directly otherwise.

    q: [batch, q_len, heads, head_dim]; k, v: [batch, kv_len, kv_heads, head_dim];
    block_mask: [batch or 1, heads or 1, q_blocks, kv_blocks]. Returns the shape of q.

    A concrete mask with broadcast batch and heads dims (the static patterns) is closed over,
    not passed through shard_map, so the kernel still derives its visit lists and their exact
    width on the host. Any other mask is a sharded operand: traced inside, as a routed mask
    already is. A concrete mask whose per-shard slices differ cannot stay concrete: the body
    is traced once for all shards.
    """
    mesh = kernel_mesh()
    kernel = functools.partial(kernels_pallas.block_sparse_attention, **kernel_args)
    if mesh is None:
        return kernel(q, k, v, block_mask)
    spec = attention_spec(mesh, q.shape[0], q.shape[2], k.shape[2])
    free = frozenset(name for name in mesh.axis_names if name not in mesh.manual_axes)
    # check_vma=False: the compiled kernels declare how their outputs vary, but JAX's Pallas
    # interpreter (impl "interpret", the CPU tests) does not propagate varying axes. Nothing is
    # lost: the body has no collectives and its output is split like q.
    shard = functools.partial(
        jax.shard_map, mesh=mesh, out_specs=spec, axis_names=free, check_vma=False
    )
    if mask_info.is_concrete(block_mask) and np.shape(block_mask)[:2] == (1, 1):
        body = shard(lambda q, k, v: kernel(q, k, v, block_mask), in_specs=(spec, spec, spec))
        return body(q, k, v)
    body = shard(kernel, in_specs=(spec, spec, spec, _mask_spec(block_mask, spec)))
    return body(q, k, v, block_mask)
