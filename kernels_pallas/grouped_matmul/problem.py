"""One call of a grouped-matmul kernel, prepared the same way for the TPU and the GPU kernels.

Both backends implement the same two operations:

- gmm: `[m, c] x [g, c, o] -> [m, o]`, each row of a local group times its group's matrix
  (with `transpose_rhs`, rhs is `[g, o, c]` and each matrix is used transposed); rows of other
  groups and rows past the groups come out zero.
- tgmm: `[m, k], [m, n] -> [g, k, n]`, per local group its rows of lhs transposed times its
  rows of dout (rhs's gradient); a group with no rows gets zeros.

Local group i is global group `group_offset + i` of `group_sizes`, and the rows are sorted by
group. Here the tiles are fitted to the shape (`tiling.fit_tile`), the operands padded to whole
tiles (`tiling.pad_to_tiles`) and the local groups' row bounds computed; the backends decide the
grid and the kernel. `poison_output` is the testing aid both offer: an output buffer full of NaN
aliased in, so any element a kernel leaves unwritten shows.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.grouped_matmul import metadata
from kernels_pallas.grouped_matmul.tiling import Tiling, fit_tile, pad_to_tiles


class GmmProblem(NamedTuple):
    """A gmm call fitted to its tiles.

    lhs: [rows, C] padded; rhs: [g, C, cols] (or [g, cols, C] transposed) padded.
    tiles: (tm, tc, to) actually used.
    starts, ends: int32 [g]: the local groups' rows are [starts[i], ends[i]).
    m, o: the unpadded output shape; rows, cols: the padded one.
    """

    lhs: jax.Array
    rhs: jax.Array
    tiles: Tiling
    starts: jax.Array
    ends: jax.Array
    m: int
    o: int
    rows: int
    cols: int


class TgmmProblem(NamedTuple):
    """A tgmm call fitted to its tiles.

    lhs: [M, K] padded; dout: [M, N] padded; tiles: (tm, tk, tn) actually used.
    starts, ends: int32 [g] row bounds of the local groups.
    k, n: the unpadded sides of each group's output; out_shape: the padded [g, K, N].
    """

    lhs: jax.Array
    dout: jax.Array
    tiles: Tiling
    starts: jax.Array
    ends: jax.Array
    k: int
    n: int
    out_shape: tuple[int, int, int]


def gmm_problem(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    group_offset: jax.Array,
    tiling: Tiling,
    transpose_rhs: bool,
    backend: str,
) -> GmmProblem:
    """Fits and pads a gmm call for `backend`'s kernel.

    Args:
      lhs: [m, c], m >= 1, rows sorted by group.
      rhs: [g, c, o], or [g, o, c] with `transpose_rhs`; g >= 1 local groups.
      group_sizes: [num_groups_total] int32.
      group_offset: [] int32; local group i is global group group_offset + i.
      tiling: (tm, tc, to) for rows, contracting and output columns, before fitting.
      transpose_rhs: see rhs.
      backend: "tpu" or "gpu" (their tiles fit differently).
    """
    m, c = lhs.shape
    num_groups = rhs.shape[0]
    o = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tc, to = (fit_tile(t, size, backend) for t, size in zip(tiling, (m, c, o), strict=True))
    lhs = pad_to_tiles(lhs, (tm, tc))
    rhs = pad_to_tiles(rhs, (1, to, tc) if transpose_rhs else (1, tc, to))
    starts, ends = metadata.local_group_bounds(group_sizes, group_offset, num_groups, m)
    cols = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    return GmmProblem(lhs, rhs, (tm, tc, to), starts, ends, m, o, lhs.shape[0], cols)


def tgmm_problem(
    lhs: jax.Array,
    dout: jax.Array,
    group_sizes: jax.Array,
    group_offset: jax.Array,
    num_groups: int,
    tiling: Tiling,
    backend: str,
) -> TgmmProblem:
    """Fits and pads a tgmm call for `backend`'s kernel.

    Args:
      lhs: [m, k], m >= 1, rows sorted by group.
      dout: [m, n].
      group_sizes: [num_groups_total] int32.
      group_offset: [] int32; local group i is global group group_offset + i.
      num_groups: local groups, >= 1.
      tiling: (tm, tk, tn), before fitting.
      backend: "tpu" or "gpu".
    """
    m, k = lhs.shape
    n = dout.shape[1]
    tm, tk, tn = (fit_tile(t, size, backend) for t, size in zip(tiling, (m, k, n), strict=True))
    lhs = pad_to_tiles(lhs, (tm, tk))
    dout = pad_to_tiles(dout, (tm, tn))
    starts, ends = metadata.local_group_bounds(group_sizes, group_offset, num_groups, m)
    out_shape = (num_groups, lhs.shape[1], dout.shape[1])
    return TgmmProblem(lhs, dout, (tm, tk, tn), starts, ends, k, n, out_shape)


def poison_output(
    in_specs: list,
    operands: list,
    out_spec: pl.BlockSpec,
    shape: tuple[int, ...],
    dtype: jnp.dtype,
    first_operand: int = 0,
) -> dict[int, int]:
    """Appends an output-shaped buffer of NaN to `in_specs` and `operands` and returns the
    `input_output_aliases` that make it the output. `first_operand`: how many
    `pallas_call` inputs come before `operands` (scalar-prefetched arrays)."""
    in_specs.append(out_spec)
    operands.append(jnp.full(shape, jnp.nan, dtype))
    return {first_operand + len(operands) - 1: 0}
