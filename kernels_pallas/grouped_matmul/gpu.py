"""Grouped matmul kernels for GPU (Pallas on Triton): gmm and its transpose tgmm.

Triton programs run concurrently with no order between them, so here, unlike the TPU kernels'
sequential visits, each program owns its output block outright and loops over what it needs:

- gmm: a program per (row tile, output column tile). It loops over the run of groups whose rows
  the tile holds (`metadata.tile_group_ranges`), computes the tile against each group's matrix
  over the contracting axis, and keeps each group's rows with a row mask. A tile of no group
  is written as zeros.
- tgmm: a program per (group, k tile, n tile) block of the output. It loops over the row tiles
  its group's rows touch, zeroing foreign rows in both operands, and sums lhs^T dout over them;
  an empty group loops zero times and writes zeros.

Operands are whole-array references read with dynamic slices of power-of-two tiles, as every
array a Triton program holds has power-of-two sides; they come in padded to whole tiles
(`problem.gmm_problem`). `interpret` is passed to `pl.pallas_call`: False compiles with Triton,
True runs the generic interpreter (on any backend, CPU included). `poison=True` (a testing aid)
starts from an output full of NaN aliased in, so any element left unwritten shows.

Sums run in float32, or in float64 for float64 operands (which only the interpreter takes).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas import varying
from kernels_pallas.grouped_matmul import metadata, problem
from kernels_pallas.grouped_matmul.tiling import GPU_NUM_STAGES, GPU_NUM_WARPS, Tiling

NUM_METADATA_ARRAYS = 4


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    group_offset: jax.Array,
    *,
    tiling: Tiling,
    transpose_rhs: bool,
    out_dtype: jnp.dtype,
    interpret: bool,
    poison: bool = False,
) -> jax.Array:
    """gmm as `problem` states it, one program per (row tile, output column tile).

    Arguments as `problem.gmm_problem` takes them (tiles powers of two), plus `out_dtype` (sums
    run in at least float32), `interpret` (`pl.pallas_call`'s) and `poison` (start from an
    output full of NaN, a testing aid). Returns [m, o] in out_dtype.
    """
    p = problem.gmm_problem(lhs, rhs, group_sizes, group_offset, tiling, transpose_rhs, "gpu")
    tm, tc, to = p.tiles
    m_tiles = p.rows // tm
    first_group, group_count = metadata.tile_group_ranges(p.starts, p.ends, m_tiles, tm)
    operands = [first_group, group_count, p.starts, p.ends, p.lhs, p.rhs]
    in_specs = [_whole(x) for x in operands]
    out_spec = pl.BlockSpec((tm, to), lambda i, j: (i, j))
    aliases = {}
    if poison:
        aliases = problem.poison_output(in_specs, operands, out_spec, (p.rows, p.cols), out_dtype)
    kernel = functools.partial(
        _gmm_kernel,
        tiles=(tm, tc, to),
        num_c_tiles=p.lhs.shape[1] // tc,
        transpose_rhs=transpose_rhs,
        acc_dtype=jnp.promote_types(lhs.dtype, jnp.float32),
    )
    out = pl.pallas_call(
        kernel,
        out_shape=varying.out_struct((p.rows, p.cols), out_dtype, *operands),
        grid=(m_tiles, p.cols // to),
        in_specs=in_specs,
        out_specs=out_spec,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=GPU_NUM_WARPS, num_stages=GPU_NUM_STAGES),
        interpret=interpret,
        name="moejax_gmm",
    )(*operands)
    return out[: p.m, : p.o]


def _gmm_kernel(
    first_group_ref,
    group_count_ref,
    starts_ref,
    ends_ref,
    lhs_ref,
    rhs_ref,
    *refs,
    tiles: Tiling,
    num_c_tiles: int,
    transpose_rhs: bool,
    acc_dtype: jnp.dtype,
):
    out_ref = refs[-1]
    tm, tc, to = tiles
    tile, col_tile = pl.program_id(0), pl.program_id(1)
    rows = tile * tm + jnp.arange(tm)  # [tm]
    first_group = first_group_ref[tile]

    def product(group: jax.Array) -> jax.Array:
        def step(kk: jax.Array, acc: jax.Array) -> jax.Array:
            x = lhs_ref[pl.ds(tile * tm, tm), pl.ds(kk * tc, tc)]  # [tm, tc]
            if transpose_rhs:
                w = rhs_ref[group, pl.ds(col_tile * to, to), pl.ds(kk * tc, tc)]  # [to, tc]
            else:
                w = rhs_ref[group, pl.ds(kk * tc, tc), pl.ds(col_tile * to, to)]  # [tc, to]
            contracting = (1,) if transpose_rhs else (0,)
            return acc + jax.lax.dot_general(
                x, w, (((1,), contracting), ((), ())), preferred_element_type=acc_dtype
            )

        return jax.lax.fori_loop(0, num_c_tiles, step, jnp.zeros((tm, to), acc_dtype))

    def add_group(i: jax.Array, out: jax.Array) -> jax.Array:
        group = first_group + i
        start, end = starts_ref[group], ends_ref[group]
        mine = ((rows >= start) & (rows < end))[:, None]  # [tm, 1]
        # An empty group inside the run owns no row: skip its matmul.
        return jax.lax.cond(end > start, lambda: jnp.where(mine, product(group), out), lambda: out)

    out = jax.lax.fori_loop(
        0, group_count_ref[tile], add_group, jnp.zeros((tm, to), acc_dtype)
    )  # [tm, to]
    out_ref[...] = out.astype(out_ref.dtype)


def tgmm(
    lhs: jax.Array,
    dout: jax.Array,
    group_sizes: jax.Array,
    group_offset: jax.Array,
    num_groups: int,
    *,
    tiling: Tiling,
    out_dtype: jnp.dtype,
    interpret: bool,
    poison: bool = False,
) -> jax.Array:
    """tgmm as `problem` states it, one program per (group, k tile, n tile) output block.

    Arguments as `problem.tgmm_problem` takes them (tiles powers of two), plus `out_dtype`,
    `interpret` and `poison` as in `gmm`. Returns [num_groups, k, n] in out_dtype.
    """
    p = problem.tgmm_problem(lhs, dout, group_sizes, group_offset, num_groups, tiling, "gpu")
    tm, tk, tn = p.tiles
    operands = [p.starts, p.ends, p.lhs, p.dout]
    in_specs = [_whole(x) for x in operands]
    out_spec = pl.BlockSpec((None, tk, tn), lambda g, kk, j: (g, kk, j))
    aliases = {}
    if poison:
        aliases = problem.poison_output(in_specs, operands, out_spec, p.out_shape, out_dtype)
    out = pl.pallas_call(
        functools.partial(
            _tgmm_kernel, tiles=(tm, tk, tn), acc_dtype=jnp.promote_types(lhs.dtype, jnp.float32)
        ),
        out_shape=varying.out_struct(p.out_shape, out_dtype, *operands),
        grid=(num_groups, p.out_shape[1] // tk, p.out_shape[2] // tn),
        in_specs=in_specs,
        out_specs=out_spec,
        input_output_aliases=aliases,
        compiler_params=plgpu.CompilerParams(num_warps=GPU_NUM_WARPS, num_stages=GPU_NUM_STAGES),
        interpret=interpret,
        name="moejax_tgmm",
    )(*operands)
    return out[:, : p.k, : p.n]


def _tgmm_kernel(
    starts_ref, ends_ref, lhs_ref, dout_ref, *refs, tiles: Tiling, acc_dtype: jnp.dtype
):
    out_ref = refs[-1]
    tm, tk, tn = tiles
    group, k_tile, n_tile = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = starts_ref[group], ends_ref[group]
    first_tile = start // tm
    stop_tile = jnp.where(end > start, (end - 1) // tm + 1, first_tile)

    def step(tile: jax.Array, acc: jax.Array) -> jax.Array:
        rows = tile * tm + jnp.arange(tm)  # [tm]
        mine = ((rows >= start) & (rows < end))[:, None]  # [tm, 1]
        x = lhs_ref[pl.ds(tile * tm, tm), pl.ds(k_tile * tk, tk)]  # [tm, tk]
        y = dout_ref[pl.ds(tile * tm, tm), pl.ds(n_tile * tn, tn)]  # [tm, tn]
        # Foreign rows are zeroed in both operands: a 0 times an inf there would still be NaN.
        x = jnp.where(mine, x, jnp.zeros((), x.dtype))
        y = jnp.where(mine, y, jnp.zeros((), y.dtype))
        return acc + jax.lax.dot_general(
            x, y, (((0,), (0,)), ((), ())), preferred_element_type=acc_dtype
        )

    acc = jax.lax.fori_loop(first_tile, stop_tile, step, jnp.zeros((tk, tn), acc_dtype))
    out_ref[...] = acc.astype(out_ref.dtype)


def _whole(x: jax.Array) -> pl.BlockSpec:
    """A block spec handing the program the whole array, to be read with dynamic slices."""
    return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)
