"""Grouped matmul kernels for TPU (Pallas Mosaic): gmm and its transpose tgmm.

Both walk a list of visits (`metadata`): a visit is one row tile computed for one group, and a
tile that straddles groups is visited once per group, keeping only that group's rows. The visit
list is scalar-prefetched into SMEM so that the block index maps can follow it: the grid's visit
axis picks, through it, which row tile of lhs and which group's matrix are fetched next. Each
output block accumulates in a float32 VMEM scratch over the contracting axis (and, in tgmm, over
a group's visits) and is stored once, in the output dtype.

Operands come in padded to whole tiles (`problem.gmm_problem`) and the result goes out cut back.
`interpret` is passed to `pl.pallas_call`: False compiles with Mosaic, True runs the generic
interpreter, and a `pltpu.InterpretParams` runs the TPU-faithful interpreter (which can check
out-of-bounds reads and fill uninitialised memory with NaN).

`poison=True` (a testing aid) hands the kernel an output buffer full of NaN through
`input_output_aliases`: any output element the kernel fails to write comes out NaN.

Sums run in float32, or in float64 for float64 operands (which only the interpreters take).
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import varying
from kernels_pallas.grouped_matmul import metadata, problem
from kernels_pallas.grouped_matmul.tiling import Tiling

NUM_VISIT_ARRAYS = 4  # tile_ids, group_ids, row_starts, row_ends, all scalar-prefetched


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    group_offset: jax.Array,
    *,
    tiling: Tiling,
    transpose_rhs: bool,
    out_dtype: jnp.dtype,
    interpret: Any,
    poison: bool = False,
) -> jax.Array:
    """gmm as `problem` states it, over a grid of (output column tile, visit, contracting tile).

    Arguments as `problem.gmm_problem` takes them, plus `out_dtype` (sums run in at least
    float32), `interpret` (`pl.pallas_call`'s) and `poison` (start from an output full of NaN,
    see the module docstring). Returns [m, o] in out_dtype.
    """
    p = problem.gmm_problem(lhs, rhs, group_sizes, group_offset, tiling, transpose_rhs, "tpu")
    tm, tc, to = p.tiles
    acc_dtype = jnp.promote_types(lhs.dtype, jnp.float32)
    visits = metadata.row_tile_visits(p.starts, p.ends, p.rows // tm, tm)  # 4 x [V]
    grid = (p.cols // to, visits[0].shape[0], p.lhs.shape[1] // tc)

    def lhs_index(j, v, kk, tile_ids, group_ids, row_starts, row_ends):
        return tile_ids[v], kk

    def rhs_index(j, v, kk, tile_ids, group_ids, row_starts, row_ends):
        return (group_ids[v], j, kk) if transpose_rhs else (group_ids[v], kk, j)

    def out_index(j, v, kk, tile_ids, group_ids, row_starts, row_ends):
        return tile_ids[v], j

    rhs_block = (None, to, tc) if transpose_rhs else (None, tc, to)
    in_specs = [pl.BlockSpec((tm, tc), lhs_index), pl.BlockSpec(rhs_block, rhs_index)]
    operands = [p.lhs, p.rhs]
    out_spec = pl.BlockSpec((tm, to), out_index)
    aliases = {}
    if poison:
        shape = (p.rows, p.cols)
        aliases = problem.poison_output(
            in_specs, operands, out_spec, shape, out_dtype, first_operand=NUM_VISIT_ARRAYS
        )
    out = pl.pallas_call(
        functools.partial(_gmm_kernel, tm=tm, transpose_rhs=transpose_rhs, poison=poison),
        out_shape=varying.out_struct((p.rows, p.cols), out_dtype, *operands),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=NUM_VISIT_ARRAYS,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_spec,
            scratch_shapes=[pltpu.VMEM((tm, to), acc_dtype)],
        ),
        input_output_aliases=aliases,
        # Output column tiles are independent; visits revisit output blocks and k accumulates.
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")
        ),
        interpret=interpret,
        name="moejax_gmm",
    )(*visits, *operands)
    return out[: p.m, : p.o]


def _gmm_kernel(
    tile_ids, group_ids, row_starts, row_ends, lhs_ref, rhs_ref, *refs, tm, transpose_rhs, poison
):
    del group_ids  # used by the index maps only
    out_ref, acc_ref = refs[1:] if poison else refs
    v, kk = pl.program_id(1), pl.program_id(2)
    row_start, row_end = row_starts[v], row_ends[v]

    @pl.when(kk == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(row_end > row_start)
    def _accumulate():
        contracting = (1,) if transpose_rhs else (0,)
        acc_ref[...] += jax.lax.dot_general(
            lhs_ref[...],
            rhs_ref[...],
            (((1,), contracting), ((), ())),
            preferred_element_type=acc_ref.dtype,
        )

    @pl.when(kk == pl.num_programs(2) - 1)
    def _store():
        rows = tile_ids[v] * tm + jax.lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
        mine = (rows >= row_start) & (rows < row_end)  # [tm, to]
        # The first visit of a tile owns all its rows: those of no visited group become zeros.
        first = (v == 0) | (tile_ids[jnp.maximum(v - 1, 0)] != tile_ids[v])

        @pl.when(first)
        def _init():
            out_ref[...] = jnp.where(mine, acc_ref[...], 0.0).astype(out_ref.dtype)

        @pl.when(jnp.logical_not(first))
        def _merge():
            kept = out_ref[...].astype(acc_ref.dtype)
            out_ref[...] = jnp.where(mine, acc_ref[...], kept).astype(out_ref.dtype)


def tgmm(
    lhs: jax.Array,
    dout: jax.Array,
    group_sizes: jax.Array,
    group_offset: jax.Array,
    num_groups: int,
    *,
    tiling: Tiling,
    out_dtype: jnp.dtype,
    interpret: Any,
    poison: bool = False,
) -> jax.Array:
    """tgmm as `problem` states it, over a grid of (n tile, k tile, visit).

    Arguments as `problem.tgmm_problem` takes them, plus `out_dtype`, `interpret` and `poison`
    as in `gmm`. Returns [num_groups, k, n] in out_dtype.
    """
    p = problem.tgmm_problem(lhs, dout, group_sizes, group_offset, num_groups, tiling, "tpu")
    tm, tk, tn = p.tiles
    acc_dtype = jnp.promote_types(lhs.dtype, jnp.float32)
    visits = metadata.group_tile_visits(p.starts, p.ends, p.lhs.shape[0] // tm, tm)  # 4 x [V]
    grid = (p.out_shape[2] // tn, p.out_shape[1] // tk, visits[0].shape[0])

    def lhs_index(j, kk, v, tile_ids, group_ids, row_starts, row_ends):
        return tile_ids[v], kk

    def dout_index(j, kk, v, tile_ids, group_ids, row_starts, row_ends):
        return tile_ids[v], j

    def out_index(j, kk, v, tile_ids, group_ids, row_starts, row_ends):
        return group_ids[v], kk, j

    in_specs = [pl.BlockSpec((tm, tk), lhs_index), pl.BlockSpec((tm, tn), dout_index)]
    operands = [p.lhs, p.dout]
    out_spec = pl.BlockSpec((None, tk, tn), out_index)
    aliases = {}
    if poison:
        aliases = problem.poison_output(
            in_specs, operands, out_spec, p.out_shape, out_dtype, first_operand=NUM_VISIT_ARRAYS
        )
    out = pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm, poison=poison),
        out_shape=varying.out_struct(p.out_shape, out_dtype, *operands),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=NUM_VISIT_ARRAYS,
            grid=grid,
            in_specs=in_specs,
            out_specs=out_spec,
            scratch_shapes=[pltpu.VMEM((tk, tn), acc_dtype)],
        ),
        input_output_aliases=aliases,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="moejax_tgmm",
    )(*visits, *operands)
    return out[:, : p.k, : p.n]


def _tgmm_kernel(tile_ids, group_ids, row_starts, row_ends, lhs_ref, dout_ref, *refs, tm, poison):
    out_ref, acc_ref = refs[1:] if poison else refs
    v, last_v = pl.program_id(2), pl.num_programs(2) - 1
    group = group_ids[v]
    row_start, row_end = row_starts[v], row_ends[v]

    @pl.when((v == 0) | (group_ids[jnp.maximum(v - 1, 0)] != group))
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(row_end > row_start)
    def _accumulate():
        # Foreign rows are zeroed in both operands: a 0 times an inf there would still be NaN.
        first_row = tile_ids[v] * tm
        lhs = _keep_rows(lhs_ref[...], first_row, row_start, row_end, acc_ref.dtype)  # [tm, tk]
        dout = _keep_rows(dout_ref[...], first_row, row_start, row_end, acc_ref.dtype)  # [tm, tn]
        acc_ref[...] += jnp.dot(
            lhs.T.astype(lhs_ref.dtype),
            dout.astype(dout_ref.dtype),
            preferred_element_type=acc_ref.dtype,
        )

    @pl.when((v == last_v) | (group_ids[jnp.minimum(v + 1, last_v)] != group))
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def _keep_rows(
    x: jax.Array, first_row: jax.Array, start: jax.Array, end: jax.Array, dtype: jnp.dtype
) -> jax.Array:
    """x in `dtype` with the rows outside [start, end) zeroed; row 0 of x is row `first_row`.

    Selecting in the (at least float32) accumulation dtype because bfloat16 selects are not
    native on every TPU generation.
    """
    rows = first_row + jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.where((rows >= start) & (rows < end), x.astype(dtype), 0.0)
