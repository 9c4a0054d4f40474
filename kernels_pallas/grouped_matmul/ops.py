"""The public grouped matmul: argument checks and the choice of implementation.

Implementations (`impl`):

- "pallas": our Pallas kernels, compiled for the target platform: the Mosaic TPU kernels
  (`tpu.py`) on TPU; on GPU the Mosaic GPU kernels (`mosaic_gpu.py`) on Hopper and later (the
  chip's device kind, `gpu_chips.target_chip`), the Triton kernels (`gpu.py`) on earlier GPUs
  such as the A100, which Mosaic GPU does not serve. A ValueError on CPU.
- "interpret": the same kernels run by a Pallas interpreter, on any backend (CPU in CI).
  Which kernel: `backend="tpu"`, `"gpu"` (Triton) or `"mosaic_gpu"` (under the Mosaic GPU
  interpreter). By default the Triton kernel under the generic interpreter
  (`interpret=True`); passing `interpret_params=pltpu.InterpretParams(...)` selects the TPU
  kernel under the TPU-faithful interpreter, which checks out-of-bounds reads and fills
  uninitialised memory (NaN by default). `backend="tpu"` alone runs the TPU kernel under the
  generic interpreter.
- "xla": `jax.lax.ragged_dot`. On GPU, XLA rewrites it into a dense matmul over every group
  (num_groups times the FLOPs, plus a scratch buffer): it warns once per group count there.
- "xla_tiled": dense XLA matmuls over row tiles (`xla_tiled.py`), the fast path on CPU.
- "auto": "pallas" on TPU and GPU, "xla_tiled" on CPU; never "xla".

Every implementation is differentiable; the Pallas ones through `ops_pallas` (custom_vjp with
backward kernels).
"""

import warnings
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.typing import ArrayLike, DTypeLike

from kernels_pallas import gpu_chips, varying
from kernels_pallas.grouped_matmul import ops_pallas, xla_tiled
from kernels_pallas.grouped_matmul import tiling as tiling_lib
from kernels_pallas.platform import target_platform

GMM_IMPLS = ("auto", "pallas", "interpret", "xla", "xla_tiled")
PALLAS_IMPLS = ("pallas", "interpret")


def gmm(
    lhs: ArrayLike,
    rhs: ArrayLike,
    group_sizes: ArrayLike,
    *,
    impl: str = "auto",
    preferred_element_type: DTypeLike | None = None,
    tiling: tuple[int, int, int] | None = None,
    group_offset: ArrayLike | None = None,
    backend: str | None = None,
    interpret_params: pltpu.InterpretParams | None = None,
    tile_m: int | None = None,
) -> jax.Array:
    """Grouped matmul with the contract of `jax.lax.ragged_dot`, optionally on a range of groups.

    Rows of `lhs` are sorted by group: group g owns `group_sizes[g]` consecutive rows, which
    are multiplied by its matrix. Rows past `sum(group_sizes)` come out as zeros. The sum must not
    exceed m; it is a traced value, so that is the caller's promise, not a check.

    With `group_offset`, rhs holds only groups `[group_offset, group_offset + rhs.shape[0])` of
    the `group_sizes.shape[0]` groups (expert sharding): rows of the other groups come out zero
    and get zero gradient.

    Args:
      lhs: [m, k] floating, rows sorted by group.
      rhs: [num_local_groups, k, n], same dtype as `lhs`.
      group_sizes: [num_groups] int32; num_groups == num_local_groups without group_offset.
      impl: one of `GMM_IMPLS`, see the module docstring.
      preferred_element_type: output dtype; defaults to the dtype of `lhs`. Products are
        accumulated in at least float32 whatever the input dtype.
      tiling: (tm, tk, tn) of the forward Pallas kernel, reused by the backward kernels in the
        roles their shapes give them; defaults to `tiling.default_tilings` (per kernel, dtype
        and chip). Powers of two for the GPU kernels, which compiled must fit the chip's
        shared memory (a ValueError says by how much they do not). Ignored by "xla" and
        "xla_tiled".
      group_offset: [] int, the first group rhs holds; None means 0 with all groups local. A
        traced offset is the caller's promise to stay in range (it is clamped).
      backend: "tpu", "gpu" or "mosaic_gpu": whose Pallas kernel "pallas"/"interpret" runs (see
        above); None picks by the target chip.
      interpret_params: TPU-interpreter settings for impl="interpret" with the TPU kernel.
      tile_m: largest row tile of "xla_tiled", a positive int; defaults to
        `xla_tiled.default_tile_m(m, num_groups)`. Ignored by the others.

    Returns:
      [m, n] in `preferred_element_type` (or the dtype of `lhs`).
    """
    impl = resolve_impl(impl)
    kernel_backend = _kernel_backend(impl, backend, interpret_params)
    if tile_m is not None and (
        isinstance(tile_m, bool) or not isinstance(tile_m, int) or tile_m < 1
    ):
        raise ValueError(f"tile_m: got {tile_m!r}; allowed: None or a positive int")
    if tiling is not None and kernel_backend is not None:
        tiling = tiling_lib.check_tiling(tiling, kernel_backend)
    lhs, rhs, group_sizes = jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes)
    _check_operands(lhs, rhs, group_sizes, has_offset=group_offset is not None)
    offset = _check_group_offset(group_offset, group_sizes.shape[0], rhs.shape[0])
    # Inside shard_map: rhs's gradient is summed over the devices sharing it out here, by
    # autodiff, not inside the kernels' custom_vjp (see `kernels_pallas.varying`).
    lhs, rhs, group_sizes, offset = varying.vary_together(lhs, rhs, group_sizes, offset)
    out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)
    if not jnp.issubdtype(out_dtype, jnp.floating):
        raise ValueError(f"preferred_element_type: must be floating, got {out_dtype}")
    (m, k), (num_local, _, n) = lhs.shape, rhs.shape
    if m == 0 or num_local == 0:
        return jnp.zeros((m, n), out_dtype)  # nothing to multiply; a kernel grid can't be empty
    if kernel_backend is not None:
        chip = gpu_chips.target_chip()
        if tiling is None:
            tilings = tiling_lib.default_tilings(
                m, k, n, num_local, kernel_backend, lhs.dtype, chip
            )
        else:
            tilings = tiling_lib.KernelTilings.from_forward(tiling)
            if kernel_backend == "gpu" and impl == "pallas":
                _check_gpu_tilings(tilings, lhs.dtype, chip)
        interpret = (interpret_params or True) if impl == "interpret" else False
        config = ops_pallas.KernelConfig(kernel_backend, tilings, out_dtype, interpret)
        return ops_pallas.gmm_pallas(lhs, rhs, group_sizes, offset, config)
    if group_offset is not None:
        rhs, group_sizes = _lead_with_empty_matrix(rhs, group_sizes, offset)
    if impl == "xla_tiled":
        if tile_m is None:
            tile_m = xla_tiled.default_tile_m(m, rhs.shape[0])
        return xla_tiled.gmm_tiled(lhs, rhs, group_sizes, tile_m=tile_m, out_dtype=out_dtype)
    if target_platform() == "gpu":
        _warn_dense_ragged_dot(group_sizes.shape[0])
    # bf16 sums over k lose too much precision; accumulate wide and round once at the end.
    accumulate_dtype = jnp.promote_types(out_dtype, jnp.float32)
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=accumulate_dtype)
    return out.astype(out_dtype)  # [m, n]


_warned_group_counts: set[int] = set()


def _warn_dense_ragged_dot(num_groups: int) -> None:
    """Once per group count: what `ragged_dot` costs on GPU."""
    if num_groups in _warned_group_counts:
        return
    _warned_group_counts.add(num_groups)
    warnings.warn(
        f"gmm impl 'xla' on GPU: XLA computes jax.lax.ragged_dot as a dense matmul over all "
        f"{num_groups} groups, {num_groups}x the FLOPs of the grouped matmul; impl 'auto' or "
        f"'pallas' runs the grouped-matmul kernel",
        stacklevel=3,
    )


def resolve_impl(impl: str) -> str:
    """The implementation `impl` names on the target platform (`kernels_pallas.platform`):
    "auto" becomes a concrete one.

    XLA:CPU lowers `ragged_dot` to a dense matmul masked per group, num_groups times the useful
    work, and cannot compile Pallas kernels, so "auto" takes "xla_tiled" there; on GPU and TPU
    it takes our compiled Pallas kernels.
    """
    if impl not in GMM_IMPLS:
        raise ValueError(f"impl: unknown value {impl!r}; allowed: {', '.join(GMM_IMPLS)}")
    if impl != "auto":
        return impl
    return "pallas" if target_platform() in tiling_lib.KERNEL_BACKENDS else "xla_tiled"


def _kernel_backend(
    impl: str, backend: str | None, interpret_params: pltpu.InterpretParams | None
) -> str | None:
    """Whose Pallas kernel `impl` runs ("tpu" or "gpu"), or None for the XLA implementations."""
    if backend is not None and backend not in tiling_lib.KERNEL_BACKENDS:
        raise ValueError(
            f"backend: unknown value {backend!r}; allowed: {', '.join(tiling_lib.KERNEL_BACKENDS)}"
        )
    if interpret_params is not None and not isinstance(interpret_params, pltpu.InterpretParams):
        raise ValueError(
            f"interpret_params: got {interpret_params!r}; allowed: None or pltpu.InterpretParams"
        )
    if impl not in PALLAS_IMPLS:
        if backend is not None or interpret_params is not None:
            raise ValueError(
                f"backend, interpret_params: only used by impl 'pallas' or 'interpret', "
                f"got impl {impl!r}"
            )
        return None
    if impl == "pallas":
        platform = target_platform()
        if platform not in tiling_lib.KERNEL_BACKENDS:
            raise ValueError(
                f"impl: 'pallas' compiles a Pallas kernel, which needs a TPU or GPU, but the "
                f"default backend is {platform!r}; allowed there: 'interpret' (the kernels in "
                f"interpret mode), 'xla_tiled', 'xla' or 'auto'"
            )
        compilable = ("gpu", "mosaic_gpu") if platform == "gpu" else (platform,)
        if backend is not None and backend not in compilable:
            raise ValueError(
                f"backend: the {backend!r} kernel cannot be compiled on {platform!r}; "
                f"allowed with impl 'pallas': None, {', '.join(compilable)}"
            )
        if interpret_params is not None:
            raise ValueError("interpret_params: only used by impl 'interpret', got 'pallas'")
        if backend is not None:
            return backend
        if platform == "gpu" and gpu_chips.target_chip().has_wgmma:
            return "mosaic_gpu"
        return platform
    if interpret_params is not None and backend in ("gpu", "mosaic_gpu"):
        raise ValueError(
            f"interpret_params: the TPU interpreter's settings; got backend {backend!r}"
        )
    return backend or ("tpu" if interpret_params is not None else "gpu")


def _check_gpu_tilings(
    tilings: tiling_lib.KernelTilings, dtype: jnp.dtype, chip: gpu_chips.GpuChip
) -> None:
    """A ValueError when a kernel of an explicit tiling would not compile on the chip."""
    tiling_lib.check_gpu_fit("gmm", tilings.forward, dtype, chip)
    tiling_lib.check_gpu_fit("gmm", tilings.lhs_grad, dtype, chip)
    tiling_lib.check_gpu_fit("tgmm", tilings.rhs_grad, dtype, chip)


def _check_group_offset(group_offset: Any, num_groups: int, num_local: int) -> jax.Array:
    """The offset as an int32 scalar; a concrete one must leave room for the local groups."""
    if group_offset is None:
        return jnp.zeros((), jnp.int32)
    offset = jnp.asarray(group_offset)
    if offset.shape not in ((), (1,)) or not jnp.issubdtype(offset.dtype, jnp.integer):
        raise ValueError(
            f"group_offset: expected an integer scalar, got shape {offset.shape} "
            f"dtype {offset.dtype}"
        )
    if not isinstance(offset, jax.core.Tracer):
        value = int(offset.reshape(()))
        if not 0 <= value <= num_groups - num_local:
            raise ValueError(
                f"group_offset: got {value}; allowed: 0 to {num_groups - num_local} for "
                f"{num_local} local groups out of {num_groups}"
            )
    return offset.reshape(()).astype(jnp.int32)


def _lead_with_empty_matrix(
    rhs: jax.Array, group_sizes: jax.Array, offset: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """rhs and group sizes of a ragged_dot problem equal to the local one.

    The rows before the local groups become one leading group multiplied by zeros; the rows
    after them are past the new sum, hence zero already. It costs a copy of rhs and, in
    "xla_tiled", the matmuls of the leading rows: this is the CPU path, not the sharded one.
    """
    num_local = rhs.shape[0]
    rows_before = jnp.sum(jnp.where(jnp.arange(group_sizes.shape[0]) < offset, group_sizes, 0))
    local_sizes = jax.lax.dynamic_slice_in_dim(group_sizes, offset, num_local)
    sizes = jnp.concatenate([rows_before[None], local_sizes]).astype(jnp.int32)  # [1 + local]
    rhs = jnp.concatenate([jnp.zeros((1, *rhs.shape[1:]), rhs.dtype), rhs])  # [1 + local, k, n]
    return rhs, sizes


def _check_operands(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, has_offset: bool
) -> None:
    """Raises a ValueError naming the offending argument when shapes or dtypes disagree."""
    if lhs.ndim != 2:
        raise ValueError(f"lhs: expected [m, k], got shape {lhs.shape}")
    if rhs.ndim != 3:
        raise ValueError(f"rhs: expected [num_groups, k, n], got shape {rhs.shape}")
    if group_sizes.ndim != 1:
        raise ValueError(f"group_sizes: expected [num_groups], got shape {group_sizes.shape}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(
            f"rhs: contracting size {rhs.shape[1]} (shape {rhs.shape}) does not match "
            f"lhs's {lhs.shape[1]} (shape {lhs.shape})"
        )
    if has_offset and group_sizes.shape[0] < rhs.shape[0]:
        raise ValueError(
            f"group_sizes: {group_sizes.shape[0]} groups, fewer than the {rhs.shape[0]} local "
            f"ones rhs holds (shape {rhs.shape})"
        )
    if not has_offset and group_sizes.shape[0] != rhs.shape[0]:
        raise ValueError(
            f"group_sizes: {group_sizes.shape[0]} groups but rhs holds {rhs.shape[0]} "
            f"(shape {rhs.shape}); pass group_offset for a local range of groups"
        )
    if not jnp.issubdtype(lhs.dtype, jnp.floating):
        raise ValueError(f"lhs: dtype must be floating, got {lhs.dtype}")
    if rhs.dtype != lhs.dtype:
        raise ValueError(f"rhs: dtype {rhs.dtype} differs from lhs's {lhs.dtype}")
    if group_sizes.dtype != jnp.int32:
        raise ValueError(f"group_sizes: dtype must be int32, got {group_sizes.dtype}")
