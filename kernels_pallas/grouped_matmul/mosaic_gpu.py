"""Grouped matmul kernels for Hopper GPUs (Pallas on Mosaic GPU): gmm and its transpose tgmm.

The same two operations as `gpu.py` (Pallas on Triton), with the same arguments and results, for
JAX's Mosaic GPU backend, whose matmuls are Hopper's warpgroup matmuls (WGMMA) fed from shared
memory by the tensor memory accelerator (TMA).

WGMMA multiplies whole shared-memory tiles as the TMA loaded them; keeping only some rows of a
tile would mean rewriting the tile in shared memory between the load and the matmul. The kernels
never mask instead: the rows are first laid out tile-aligned (`_aligned_rows`), each local
group's rows gathered to start on a row-tile boundary, the rest of its last tile and any trailing
tiles filled with zeros, rows of other groups left out. This is the padded layout of Gale et al.,
"MegaBlocks: Efficient Sparse Training with Mixture-of-Experts" (2022): every row tile belongs to
one group or to none. The price: a gather of lhs (and of dout for tgmm), for gmm a gather of the
output back, and up to G - 1 more row tiles than the rows need (G local groups).

- gmm: a block per (aligned row tile, output column tile), pipelining the contracting axis
  through shared memory into one WGMMA accumulator; a tile of no group is skipped, and its rows
  are never gathered back (rows of no local group come out as zeros from that gather).
- tgmm: a block per (group, k tile, n tile) of the output, pipelining over the group's own row
  tiles (a dynamic count: an empty group runs none and writes zeros).

Float32 operands run as TF32 WGMMAs, which Mosaic GPU accepts only with the contracting axis
minor in both operands ("K-major"; otherwise "Only f16 WGMMA supports transposes"): for them the
wrapper transposes what is not (rhs of the forward gmm; lhs and dout of tgmm, after the gather
that aligns them). 16-bit operands take either layout as they are.

`interpret=True` runs the Mosaic GPU interpreter (`plgpu.InterpretGPUParams`) on any backend,
CPU included; False compiles for the GPU. Sums run in float32, or in float64 for float64
operands (which only the interpreter takes).
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas import gpu_chips, varying
from kernels_pallas.grouped_matmul import metadata
from kernels_pallas.grouped_matmul.tiling import Tiling, fit_tile, pad_to_tiles, round_up

# One warpgroup's WGMMA produces 64 rows of its accumulator at a time.
WGMMA_ROWS = 64
# Shared memory the chip's limit leaves for tiles: Mosaic also places the pipeline's barriers
# there and aligns each buffer.
SHARED_MEMORY_RESERVE = 1024
# Pipeline depth when shared memory allows: loads of the next steps overlap the current WGMMA.
MAX_STAGES = 3


class _AlignedRows(NamedTuple):
    """The tile-aligned row layout of the local groups.

    source: [tiles * tm] int32, the row of lhs each aligned row holds, or m (out of range: a zero
      row) for padding.
    dest: [m] int32, the aligned row of each row of a local group (0 for other rows).
    local: [m] bool, whether the row belongs to a local group.
    tile_group: [tiles] int32, the local group of each aligned tile, or -1 for a tile of none.
    first_tile, num_tiles: [G] int32, each group's run of aligned tiles.
    """

    source: jax.Array
    dest: jax.Array
    local: jax.Array
    tile_group: jax.Array
    first_tile: jax.Array
    num_tiles: jax.Array


def _aligned_rows(starts: jax.Array, ends: jax.Array, m: int, tm: int) -> _AlignedRows:
    """Lays the local groups' rows `[starts[g], ends[g])` out on tm-row tile boundaries.

    Group g of n rows takes ceil(n / tm) tiles, so all take at most ceil(m / tm) + G - 1: that
    static bound is the aligned layout's size.
    """
    num_groups = starts.shape[0]
    tiles = pl.cdiv(m, tm) + num_groups - 1
    num_tiles = (ends - starts + tm - 1) // tm  # [G]
    tile_ends = jnp.cumsum(num_tiles, dtype=jnp.int32)  # [G]
    first_tile = tile_ends - num_tiles

    tile = jnp.arange(tiles, dtype=jnp.int32)  # [tiles]
    group = jnp.minimum(jnp.searchsorted(tile_ends, tile, side="right"), num_groups - 1)
    live = tile < tile_ends[-1]
    tile_group = jnp.where(live, group, -1).astype(jnp.int32)

    row = jnp.arange(tiles * tm, dtype=jnp.int32)  # [tiles * tm]
    row_group = jnp.repeat(group, tm)
    source = starts[row_group] + row - first_tile[row_group] * tm
    source = jnp.where(jnp.repeat(live, tm) & (source < ends[row_group]), source, m)

    # Local groups are consecutive, so the first whose end passes a row holds it, if any does.
    row = jnp.arange(m, dtype=jnp.int32)  # [m]
    owner = jnp.searchsorted(ends, row, side="right")
    clipped = jnp.minimum(owner, num_groups - 1)
    local = (owner < num_groups) & (row >= starts[clipped])
    dest = jnp.where(local, first_tile[clipped] * tm + row - starts[clipped], 0)
    return _AlignedRows(source, dest, local, tile_group, first_tile, num_tiles)


def _gather_rows(x: jax.Array, source: jax.Array) -> jax.Array:
    """x's rows at `source`, zeros where the index is out of range."""
    return x.at[source].get(mode="fill", fill_value=0)


def _wgmma_rows(tile: int, size: int) -> int:
    """A tile fitted to `size` as `tiling.fit_tile` does, then raised to whole WGMMAs."""
    return round_up(max(fit_tile(tile, size, "gpu"), WGMMA_ROWS), WGMMA_ROWS)


def _k_major(dtype: jnp.dtype) -> bool:
    """Whether WGMMA needs both operands with the contracting axis minor: all but 16-bit types."""
    return jnp.dtype(dtype).itemsize > 2


def pipeline_stages(stage_bytes: int, out_bytes: int, what: str) -> int:
    """The pipeline depth, up to `MAX_STAGES`, whose operand buffers fit the target chip's
    shared memory (`shared_memory_bytes`), or a ValueError naming the kernel when not even one
    stage does.

    stage_bytes: both operand tiles of one step; out_bytes: the output tile.
    """
    limit = gpu_chips.target_chip().shared_memory_per_block - SHARED_MEMORY_RESERVE
    stages = min(MAX_STAGES, limit // stage_bytes)
    if stages < 1 or out_bytes > limit:
        raise ValueError(
            f"tiling: {what} needs {shared_memory_bytes(1, stage_bytes, out_bytes)} bytes of "
            f"shared memory with one pipeline stage; allowed: at most {limit}"
        )
    return stages


def shared_memory_bytes(stages: int, stage_bytes: int, out_bytes: int) -> int:
    """Shared memory a kernel's block asks for, barriers aside: the pipeline's buffers and,
    once the pipeline's scope has closed and freed them, the output tile in their place."""
    return max(stages * stage_bytes, out_bytes)


def _interpret_params(interpret: object, poison: bool) -> plgpu.InterpretGPUParams | None:
    """`plgpu.kernel`'s interpret argument: None compiles (interpret False); True runs the
    interpreter with its default parameters, an `InterpretGPUParams` with those. `poison`
    makes the interpreter start every buffer full of NaN; compiled kernels cannot."""
    if not interpret:
        if poison:
            raise ValueError("poison: got True with interpret=False; allowed only interpreted")
        return None
    params = plgpu.InterpretGPUParams() if interpret is True else interpret
    return dataclasses.replace(params, uninitialized_memory="nan") if poison else params


def _store_tile(acc: jax.Array, out_ref, dtype: jnp.dtype) -> None:
    """Writes an accumulator value to the GMEM tile `out_ref` through shared memory."""

    def scope(out_smem):
        out_smem[...] = acc.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem, out_ref)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    pl.run_scoped(scope, plgpu.SMEM(acc.shape, dtype))


def _mma(acc_ref, lhs_smem, rhs_smem, stages: int) -> None:
    """acc += lhs @ rhs, leaving at most one WGMMA in flight when the pipeline releases each
    buffer one step late (`delay_release`), none otherwise."""
    plgpu.wgmma(acc_ref, lhs_smem, rhs_smem)
    plgpu.wgmma_wait(1 if stages > 1 else 0)


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
    """Grouped matmul of the local groups, a block per (aligned row tile, output column tile).

    Args:
      lhs: [m, c], rows sorted by group.
      rhs: [g, c, o], or [g, o, c] with `transpose_rhs`; g >= 1 local groups.
      group_sizes: [num_groups_total] int32.
      group_offset: [] int32; local group i is global group group_offset + i.
      tiling: (tm, tc, to), powers of two; tm is raised to a multiple of 64 (one WGMMA).
      transpose_rhs: see rhs.
      out_dtype: the output dtype; sums run in float32 (float64 for float64 operands).
      interpret: True (or a `plgpu.InterpretGPUParams`) runs the Mosaic GPU interpreter on any
        backend, CPU included; False compiles.
      poison: start the interpreter's buffers full of NaN (a testing aid, as in `gpu.py`): an
        output element nothing wrote then reads as NaN. Only with `interpret`.

    Returns:
      [m, o] in out_dtype; rows of no local group are zero.
    """
    m, c = lhs.shape
    num_groups = rhs.shape[0]
    o = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm = _wgmma_rows(tiling[0], m)
    tc, to = fit_tile(tiling[1], c, "gpu"), fit_tile(tiling[2], o, "gpu")
    acc_dtype = jnp.promote_types(lhs.dtype, jnp.float32)
    k_major = _k_major(lhs.dtype)
    if k_major and not transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)  # [g, o, c]
    rhs_k_major = transpose_rhs or k_major
    lhs = pad_to_tiles(lhs, (1, tc))
    rhs = pad_to_tiles(rhs, (1, to, tc) if rhs_k_major else (1, tc, to))
    starts, ends = metadata.local_group_bounds(group_sizes, group_offset, num_groups, m)
    rows = _aligned_rows(starts, ends, m, tm)
    lhs = _gather_rows(lhs, rows.source)  # [tiles * tm, C]
    tiles = rows.tile_group.shape[0]
    cols = rhs.shape[1] if rhs_k_major else rhs.shape[2]

    itemsize = jnp.dtype(lhs.dtype).itemsize
    stages = pipeline_stages(
        (tm * tc + tc * to) * itemsize, tm * to * jnp.dtype(out_dtype).itemsize, "gmm"
    )
    delay = int(stages > 1)
    if rhs_k_major:
        rhs_block, rhs_index = (to, tc), lambda kk, j: (j, kk)
    else:
        rhs_block, rhs_index = (tc, to), lambda kk, j: (kk, j)

    def body(tile_group_ref, lhs_ref, rhs_ref, out_ref):
        tile, col_tile = jax.lax.axis_index("rows"), jax.lax.axis_index("cols")
        group = tile_group_ref[tile]

        def accumulate(acc_ref):
            def step(_, x_smem, w_smem):  # x: [tm, tc], w: [to, tc] or [tc, to]
                _mma(acc_ref, x_smem, w_smem.T if rhs_k_major else w_smem, stages)

            plgpu.emit_pipeline(
                step,
                grid=(lhs.shape[1] // tc,),
                in_specs=[
                    plgpu.BlockSpec((tm, tc), lambda kk: (tile, kk), delay_release=delay),
                    plgpu.BlockSpec(
                        rhs_block, lambda kk: rhs_index(kk, col_tile), delay_release=delay
                    ),
                ],
                max_concurrent_steps=stages,
            )(lhs_ref, rhs_ref.at[group])
            return acc_ref[...]

        # A tile of no group is never gathered back: skip it.
        @pl.when(group >= 0)
        def _():
            acc = pl.run_scoped(accumulate, plgpu.ACC((tm, to), acc_dtype))  # [tm, to]
            out_tile = out_ref.at[pl.ds(tile * tm, tm), pl.ds(col_tile * to, to)]
            _store_tile(acc, out_tile, out_dtype)

    out = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((tiles * tm, cols), out_dtype),
        grid=(tiles, cols // to),
        grid_names=("rows", "cols"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret_params(interpret, poison),
        kernel_name="moejax_gmm_mosaic",
    )(rows.tile_group, lhs, rhs)  # [tiles * tm, cols]
    # Inside shard_map the output varies as the operands do; `plgpu.kernel` does not say so.
    out = varying.vary_together(out, rows.tile_group, lhs, rhs)[0]
    out = jnp.where(rows.local[:, None], out[rows.dest, :o], 0)  # [m, o]
    return out.astype(out_dtype)


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
    """Per local group, its rows of lhs transposed times its rows of dout.

    Args:
      lhs: [m, k], rows sorted by group.
      dout: [m, n].
      group_sizes: [num_groups_total] int32.
      group_offset: [] int32; local group i is global group group_offset + i.
      num_groups: local groups, >= 1.
      tiling: (tm, tk, tn), powers of two; tm and tk are raised to multiples of 64 (tk is the
        WGMMA accumulator's rows, tm its contracting step).
      out_dtype: the output dtype; sums run in float32 (float64 for float64 operands).
      interpret, poison: as in `gmm`.

    Returns:
      [num_groups, k, n] in out_dtype; zeros for a group with no rows.
    """
    m, k = lhs.shape
    n = dout.shape[1]
    tm, tk = (_wgmma_rows(tile, size) for tile, size in zip(tiling[:2], (m, k), strict=True))
    tn = fit_tile(tiling[2], n, "gpu")
    lhs = pad_to_tiles(lhs, (1, tk))
    dout = pad_to_tiles(dout, (1, tn))
    starts, ends = metadata.local_group_bounds(group_sizes, group_offset, num_groups, m)
    rows = _aligned_rows(starts, ends, m, tm)
    lhs = _gather_rows(lhs, rows.source)  # [tiles * tm, K]
    dout = _gather_rows(dout, rows.source)  # [tiles * tm, N]
    acc_dtype = jnp.promote_types(lhs.dtype, jnp.float32)
    k_major = _k_major(lhs.dtype)
    if k_major:
        lhs, dout = lhs.T, dout.T  # [K, tiles * tm], [N, tiles * tm]
    big_k, big_n = (lhs.shape[0], dout.shape[0]) if k_major else (lhs.shape[1], dout.shape[1])

    itemsize = jnp.dtype(lhs.dtype).itemsize
    stages = pipeline_stages(
        (tm * tk + tm * tn) * itemsize, tk * tn * jnp.dtype(out_dtype).itemsize, "tgmm"
    )
    delay = int(stages > 1)

    lhs_block, dout_block = ((tk, tm), (tn, tm)) if k_major else ((tm, tk), (tm, tn))

    def block_index(first: jax.Array, tile: jax.Array):
        """The index map of a group's pipeline: its step i reads its aligned row tile
        first + i, at column (or, K-major, row) tile `tile`."""
        if k_major:
            return lambda i: (tile, first + i)
        return lambda i: (first + i, tile)

    def body(first_tile_ref, num_tiles_ref, lhs_ref, dout_ref, out_ref):
        group = jax.lax.axis_index("groups")
        k_tile, n_tile = jax.lax.axis_index("k"), jax.lax.axis_index("n")
        first, count = first_tile_ref[group], num_tiles_ref[group]

        def accumulate(acc_ref):
            def step(_, x_smem, y_smem):
                if k_major:  # x: [tk, tm], y: [tn, tm]
                    _mma(acc_ref, x_smem, y_smem.T, stages)
                else:  # x: [tm, tk], y: [tm, tn]
                    _mma(acc_ref, x_smem.T, y_smem, stages)

            # An empty group runs no step and writes its zeros.
            @pl.when(count > 0)
            def _():
                plgpu.emit_pipeline(
                    step,
                    grid=(count,),
                    in_specs=[
                        plgpu.BlockSpec(lhs_block, block_index(first, k_tile), delay_release=delay),
                        plgpu.BlockSpec(
                            dout_block, block_index(first, n_tile), delay_release=delay
                        ),
                    ],
                    max_concurrent_steps=stages,
                )(lhs_ref, dout_ref)

            return acc_ref[...]

        acc = pl.run_scoped(accumulate, plgpu.ACC((tk, tn), acc_dtype))  # [tk, tn]
        out_tile = out_ref.at[group, pl.ds(k_tile * tk, tk), pl.ds(n_tile * tn, tn)]
        _store_tile(acc, out_tile, out_dtype)

    out = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((num_groups, big_k, big_n), out_dtype),
        grid=(num_groups, big_k // tk, big_n // tn),
        grid_names=("groups", "k", "n"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret_params(interpret, poison),
        kernel_name="moejax_tgmm_mosaic",
    )(rows.first_tile, rows.num_tiles, lhs, dout)
    out = varying.vary_together(out, rows.first_tile, rows.num_tiles, lhs, dout)[0]
    return out[:, :k, :n]
