"""The Pallas grouped matmul with its gradient: forward and backward kernels bound by custom_vjp.

For out = gmm(lhs, rhs), with each local group's rows multiplied by its matrix:

    dlhs = gmm(dout, rhs transposed)    # [m, n] x [g, n, k] -> [m, k], the same kernel
    drhs = tgmm(lhs, dout)              # per group lhs_g^T dout_g -> [g, k, n]

Rows outside the local groups get zero gradient, because both kernels only ever use the rows of
local groups. Each of the three kernels runs with its own tiling (`tiling.KernelTilings`).
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from kernels_pallas.grouped_matmul import gpu, mosaic_gpu, tpu
from kernels_pallas.grouped_matmul.tiling import KernelTilings

_KERNELS = {"tpu": tpu, "gpu": gpu, "mosaic_gpu": mosaic_gpu}


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Which kernel runs and how: static, hashable, the non-differentiable half of the call.

    backend: "tpu" (Mosaic TPU), "gpu" (Triton) or "mosaic_gpu" (Mosaic GPU, Hopper) kernels.
    tilings: the tiling of the forward and of each backward kernel.
    out_dtype: the forward output dtype.
    interpret: `pl.pallas_call`'s interpret argument (False, True or a `pltpu.InterpretParams`).
    """

    backend: str
    tilings: KernelTilings
    out_dtype: jnp.dtype
    interpret: Any


def gmm_pallas(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    group_offset: jax.Array,
    config: KernelConfig,
) -> jax.Array:
    """Differentiable grouped matmul of the local groups through the Pallas kernels.

    Args:
      lhs: [m, k], m >= 1, rows sorted by group.
      rhs: [g, k, n], g >= 1 local groups, same dtype as lhs.
      group_sizes: [num_groups_total] int32.
      group_offset: [] int32, the first local group.
      config: the kernel choice and its static settings.

    Returns:
      [m, n] in config.out_dtype; rows of no local group are zero.
    """
    return _gmm(lhs, rhs, group_sizes, group_offset, config)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    group_offset: jax.Array,
    config: KernelConfig,
) -> jax.Array:
    return _forward(lhs, rhs, group_sizes, group_offset, config)


def _forward(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    group_offset: jax.Array,
    config: KernelConfig,
) -> jax.Array:
    return _KERNELS[config.backend].gmm(
        lhs,
        rhs,
        group_sizes,
        group_offset,
        tiling=config.tilings.forward,
        transpose_rhs=False,
        out_dtype=config.out_dtype,
        interpret=config.interpret,
    )


def _gmm_fwd(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    group_offset: jax.Array,
    config: KernelConfig,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    out = _forward(lhs, rhs, group_sizes, group_offset, config)
    return out, (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(
    config: KernelConfig, residuals: tuple[jax.Array, ...], dout: jax.Array
) -> tuple[jax.Array, jax.Array, None, None]:
    lhs, rhs, group_sizes, group_offset = residuals
    kernels = _KERNELS[config.backend]
    # The operand dtype for the backward matmuls; they still sum in at least float32.
    dout = dout.astype(lhs.dtype)  # [m, n]
    dlhs = kernels.gmm(
        dout,
        rhs,
        group_sizes,
        group_offset,
        tiling=config.tilings.lhs_grad,
        transpose_rhs=True,
        out_dtype=lhs.dtype,
        interpret=config.interpret,
    )  # [m, k]
    drhs = kernels.tgmm(
        lhs,
        dout,
        group_sizes,
        group_offset,
        rhs.shape[0],
        tiling=config.tilings.rhs_grad,
        out_dtype=rhs.dtype,
        interpret=config.interpret,
    )  # [g, k, n]
    return dlhs, drhs, None, None  # group sizes and offset are integers: no cotangent


_gmm.defvjp(_gmm_fwd, _gmm_bwd)
