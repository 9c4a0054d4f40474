"""Kernels called inside `jax.shard_map`: keeping the manual axes values vary over consistent.

Inside `jax.shard_map` every value's type records the mesh axes it varies over (its "vma"). A
`jax.custom_vjp` must return cotangents varying over the same axes as its inputs, and a loop
must carry a value of one type. Our kernels mix operands that vary over different axes (a
batch-sharded lhs against expert weights that do not vary over the batch axes), so they first
make every operand vary over all of them: the conversion (`pcast` to varying) is where autodiff
sums a weight's gradient over the devices that share the weight, outside the kernel. Outside
shard_map nothing varies and these functions return their inputs unchanged.
"""

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike


def varying_axes(*arrays: jax.Array) -> tuple[str, ...]:
    """The manual mesh axes any of `arrays` varies over, sorted."""
    axes = set().union(*(jax.typeof(array).manual_axis_type.varying for array in arrays))
    return tuple(sorted(axes))


def vary_together(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """`arrays`, each made to vary over every axis any of them varies over."""
    axes = varying_axes(*arrays)
    return tuple(_vary(array, axes) for array in arrays)


def zeros_varying_like(shape: tuple[int, ...], dtype: DTypeLike, *arrays: jax.Array):
    """Zeros of `shape` varying over the axes `arrays` vary over (a loop carry they update)."""
    return _vary(jnp.zeros(shape, dtype), varying_axes(*arrays))


def _vary(array: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    missing = tuple(axis for axis in axes if axis not in jax.typeof(array).manual_axis_type.varying)
    return jax.lax.pcast(array, missing, to="varying") if missing else array


def out_struct(shape: tuple[int, ...], dtype: DTypeLike, *operands: jax.Array):
    """A `pallas_call` output of `shape` varying over the axes `operands` vary over.

    Inside a `jax.shard_map` that checks varying axes, a kernel must declare how its output
    varies; it varies as its inputs do.
    """
    axes = varying_axes(*operands)
    if not axes:
        return jax.ShapeDtypeStruct(shape, dtype)
    like = next(op for op in operands if set(axes) <= jax.typeof(op).manual_axis_type.varying)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def out_structs(out_shape, *operands: jax.Array):
    """`out_struct` for each ShapeDtypeStruct of a `pallas_call`'s `out_shape` (one or a list)."""
    return jax.tree.map(lambda struct: out_struct(struct.shape, struct.dtype, *operands), out_shape)
