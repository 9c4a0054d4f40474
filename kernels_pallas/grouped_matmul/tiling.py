"""Tile sizes of the Pallas grouped-matmul kernels: a default table, checks, and fitting to a shape.

A tiling is `(tm, tk, tn)`: rows of lhs per tile, contracting columns per step, output columns
per tile, for the forward problem `[m, k] x [g, k, n]`. The backward kernels reuse it with the
roles their shapes give them (see `ops_pallas`).

The kernels take operands padded with zeros to whole tiles (`pad_to_tiles`): zero columns add
nothing to a sum, and padded rows belong to no group. That keeps every block full, which both
compilers want, at the price of one copy of an operand whose size is not a multiple of its tile.
"""

import jax
import jax.numpy as jnp

KERNEL_BACKENDS = ("tpu", "gpu")

Tiling = tuple[int, int, int]


def default_tiling(m: int, k: int, n: int, num_groups: int, backend: str) -> Tiling:
    """The tiling for a problem `[m, k] x [num_groups, k, n]` on `backend`'s kernel.

    Row tiles grow with the mean group: a group of r rows is computed as about r / tm tiles plus
    one straddling tile shared with its neighbour, so small groups want small tiles (less wasted
    work per group) and large groups large ones (fewer grid steps, more reuse of each block of
    rhs). TPU tiles are multiples of (8, 128) as Mosaic's vector layout wants; the VMEM they take
    stays under 8 MiB in float32, inside every TPU generation's default scoped limit. GPU tiles
    are powers of two of at least 16, as Triton's `tl.dot` wants. These are starting points
    chosen by those rules, not tuned on hardware.
    """
    if backend not in KERNEL_BACKENDS:
        raise ValueError(f"backend: unknown value {backend!r}; allowed: tpu, gpu")
    rows_per_group = max(1, m // max(1, num_groups))
    if backend == "tpu":
        tm = 512 if rows_per_group >= 2048 else 256 if rows_per_group >= 512 else 128
        return tm, 512, 512
    tm = 128 if rows_per_group >= 256 else 64
    return tm, 32, 128


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
    if backend == "gpu" and any(t & (t - 1) for t in tiling):
        raise ValueError(
            f"tiling: got {tuple(tiling)!r}; the gpu kernel's tiles must be powers of two"
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
