"""Tile sizes of the Pallas grouped-matmul kernels: defaults per backend and chip, checks, fitting.

A tiling is `(tm, tk, tn)`: rows of lhs per tile, contracting columns per step, output columns
per tile, for the forward problem `[m, k] x [g, k, n]`. A call runs three kernels, each with its
own tiling (`KernelTilings`): the forward gmm, the lhs gradient (a gmm against rhs transposed,
contracting over n) and the rhs gradient (tgmm, contracting over rows).

The kernels take operands padded with zeros to whole tiles (`pad_to_tiles`): zero columns add
nothing to a sum, and padded rows belong to no group. That keeps every block full, which both
compilers want, at the price of one copy of an operand whose size is not a multiple of its tile.

GPU (Triton) tiles must fit the chip: Triton stages `GPU_NUM_STAGES` copies of both operand
tiles in shared memory to overlap loads with the matmul, and a kernel asking for more than the
chip's per-block opt-in does not compile. `gpu_shared_memory` bounds that request from above
(checked against the compiler in tests/aot/test_gpu_kernels_compile.py), and the GPU defaults are
the largest tiles under it, per dtype and chip (`kernels_pallas.gpu_chips`).
"""

import dataclasses

import jax
import jax.numpy as jnp

from kernels_pallas.gpu_chips import GpuChip

# "gpu": the Triton kernels (`gpu.py`); "mosaic_gpu": the Mosaic GPU kernels for Hopper
# (`mosaic_gpu.py`), which take the same tilings.
KERNEL_BACKENDS = ("tpu", "gpu", "mosaic_gpu")

Tiling = tuple[int, int, int]

# Triton launch settings of the grouped-matmul kernels.
GPU_NUM_WARPS = 4
GPU_NUM_STAGES = 3
# Each of the 128 threads of a program keeps its share of the float32 accumulator [rows, cols]
# in registers: 128 of its 255 registers at most, so the operands and addresses never spill.
GPU_ACCUMULATOR_ELEMENTS = 128 * GPU_NUM_WARPS * 32
# The widest contracting step the GPU defaults take: past it the pipeline gains nothing and
# small problems only pad more.
GPU_MAX_CONTRACTING_TILE = 256


@dataclasses.dataclass(frozen=True)
class KernelTilings:
    """The tiling of each kernel of one differentiable gmm call.

    forward: gmm `[m, k] x [g, k, n]` as `(tm, tk, tn)`.
    lhs_grad: gmm `[m, n] x [g, n, k]^T` (rhs transposed) as `(tm, tn, tk)`.
    rhs_grad: tgmm `[m, k]^T [m, n] -> [g, k, n]` as `(tm, tk, tn)`, tm the contracted rows.
    """

    forward: Tiling
    lhs_grad: Tiling
    rhs_grad: Tiling

    @classmethod
    def from_forward(cls, tiling: Tiling) -> "KernelTilings":
        """The backward kernels with the forward's tiles in the roles their shapes give them."""
        tm, tk, tn = tiling
        return cls(forward=(tm, tk, tn), lhs_grad=(tm, tn, tk), rhs_grad=(tm, tk, tn))


def gpu_shared_memory(kernel: str, tiling: Tiling, dtype: jnp.dtype) -> int:
    """Bytes of shared memory a GPU kernel with these tiles may ask for, at most.

    kernel "gmm" (either orientation of rhs) holds an lhs tile [tm, tc] and an rhs tile
    [tc, to]; "tgmm" an lhs tile [tm, tk] and a dout tile [tm, tn]. Triton keeps up to
    `GPU_NUM_STAGES` copies of both in flight.
    """
    tm, tc, to = tiling
    if kernel == "gmm":
        elements = tm * tc + tc * to
    elif kernel == "tgmm":
        elements = tm * tc + tm * to
    else:
        raise ValueError(f"kernel: unknown value {kernel!r}; allowed: gmm, tgmm")
    return GPU_NUM_STAGES * elements * jnp.dtype(dtype).itemsize


def gpu_accumulator_elements(kernel: str, tiling: Tiling) -> int:
    """Elements of the float32 accumulator one GPU program keeps in registers: the output
    block, [tm, to] for gmm and [tk, tn] for tgmm."""
    tm, tc, to = tiling
    return tm * to if kernel == "gmm" else tc * to


def check_gpu_fit(kernel: str, tiling: Tiling, dtype: jnp.dtype, chip: GpuChip) -> None:
    """Raises a ValueError naming the tiling when it overflows the chip's shared memory per
    block or the accumulator's register budget."""
    need = gpu_shared_memory(kernel, tiling, dtype)
    if need > chip.shared_memory_per_block:
        raise ValueError(
            f"tiling: {kernel} tiles {tuple(tiling)} in {jnp.dtype(dtype).name} need up to "
            f"{need} bytes of shared memory; allowed: at most {chip.shared_memory_per_block} "
            f"on {chip.device_kind}"
        )
    accumulator = gpu_accumulator_elements(kernel, tiling)
    if accumulator > GPU_ACCUMULATOR_ELEMENTS:
        raise ValueError(
            f"tiling: {kernel} tiles {tuple(tiling)} hold a {accumulator}-element accumulator "
            f"per program; allowed: at most {GPU_ACCUMULATOR_ELEMENTS} "
            f"({GPU_NUM_WARPS} warps, 128 registers per thread)"
        )


def default_tilings(
    m: int, k: int, n: int, num_groups: int, backend: str, dtype: jnp.dtype, chip: GpuChip
) -> KernelTilings:
    """The tilings of a problem `[m, k] x [num_groups, k, n]` in `dtype` on `backend`'s kernels.

    Row tiles grow with the mean group: a group of r rows is computed as about r / tm tiles plus
    one straddling tile shared with its neighbour, so small groups want small tiles (less wasted
    work per group) and large groups large ones (fewer grid steps, more reuse of each block of
    rhs).

    TPU: one tiling in every role, multiples of (8, 128) as Mosaic's vector layout wants; the
    VMEM they take stays under 8 MiB in float32, inside every TPU generation's default scoped
    limit (`chip` unused).

    GPU: powers of two of at least 16, as Triton's `tl.dot` wants. Each kernel's output block
    is as large as the accumulator budget allows (128 x 128, rows first), and its contracting
    tile the largest power of two, up to `GPU_MAX_CONTRACTING_TILE` and the padded contracting
    side, whose staged operands fit `chip`'s shared memory (`gpu_shared_memory`). Float32
    operands take twice the bytes of bfloat16, so they get half the contracting tile.

    These are starting points chosen by those rules, not tuned on hardware.
    """
    if backend not in KERNEL_BACKENDS:
        raise ValueError(
            f"backend: unknown value {backend!r}; allowed: {', '.join(KERNEL_BACKENDS)}"
        )
    rows_per_group = max(1, m // max(1, num_groups))
    if backend == "tpu":
        tm = 512 if rows_per_group >= 2048 else 256 if rows_per_group >= 512 else 128
        return KernelTilings.from_forward((tm, 512, 512))
    tm = fit_tile(128 if rows_per_group >= 256 else 64, m, backend)

    def gmm_tiling(contracting: int, out: int) -> Tiling:
        to = fit_tile(GPU_ACCUMULATOR_ELEMENTS // tm, out, backend)
        return tm, _widest_fitting(lambda tc: ("gmm", (tm, tc, to)), contracting, dtype, chip), to

    tk = fit_tile(128, k, backend)
    tn = fit_tile(GPU_ACCUMULATOR_ELEMENTS // tk, n, backend)
    rows = _widest_fitting(lambda t: ("tgmm", (t, tk, tn)), m, dtype, chip)
    return KernelTilings(
        forward=gmm_tiling(k, n), lhs_grad=gmm_tiling(n, k), rhs_grad=(rows, tk, tn)
    )


def _widest_fitting(kernel_tiling, size: int, dtype: jnp.dtype, chip: GpuChip) -> int:
    """The largest power of two t, from 16 up to `GPU_MAX_CONTRACTING_TILE` and the padded
    `size`, whose `kernel_tiling(t) -> (kernel, tiling)` fits the chip's shared memory."""
    tile = 16
    limit = fit_tile(GPU_MAX_CONTRACTING_TILE, size, "gpu")
    while tile * 2 <= limit:
        kernel, tiling = kernel_tiling(tile * 2)
        if gpu_shared_memory(kernel, tiling, dtype) > chip.shared_memory_per_block:
            break
        tile *= 2
    return tile


def check_tiling(tiling: object, backend: str) -> Tiling:
    """Returns `tiling` as a tuple of ints, or raises a ValueError naming what is wrong.

    Any positive ints are accepted for the TPU kernel (compiled Mosaic still wants multiples of
    (8, 128) when a dimension spans several tiles); the GPU kernel's must be powers of two, since
    every array a Triton program holds has power-of-two sides.
    """
    if (
        not isinstance(tiling, tuple | list)
        or len(tiling) != 3
        or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in tiling)
    ):
        raise ValueError(f"tiling: got {tiling!r}; allowed: None or (tm, tk, tn), positive ints")
    if backend != "tpu" and any(t & (t - 1) for t in tiling):
        raise ValueError(
            f"tiling: got {tuple(tiling)!r}; the {backend} kernel's tiles must be powers of two"
        )
    return tuple(tiling)


def fit_tile(tile: int, size: int, backend: str) -> int:
    """The tile actually used for a dimension of `size`: never much larger than the dimension.

    TPU: a dimension no larger than its tile becomes one block of the whole dimension (a block
    equal to the array's side is always legal in Mosaic). GPU: the tile shrinks to the smallest
    power of two >= the dimension, but not under 16 (`tl.dot`'s least side) unless asked for.
    """
    if backend == "tpu":
        return size if size <= tile else tile
    return min(tile, max(16, 1 << max(0, size - 1).bit_length()))


def round_up(size: int, tile: int) -> int:
    """The least multiple of `tile` that is >= `size`."""
    return -(-size // tile) * tile


def pad_to_tiles(x: jax.Array, tiles: tuple[int, ...]) -> jax.Array:
    """`x` padded with zeros at the end of each axis to a multiple of that axis's tile."""
    widths = [(0, round_up(size, tile) - size) for size, tile in zip(x.shape, tiles, strict=True)]
    if all(high == 0 for _, high in widths):
        return x
    return jnp.pad(x, widths)
