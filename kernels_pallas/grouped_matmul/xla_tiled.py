"""Grouped matmul as XLA loops over blocks of rows: close to dense speed where ragged_dot is not.

XLA:CPU lowers `jax.lax.ragged_dot` to a dense matmul masked per group, num_groups times the
useful work. Here each group's rows are cut into blocks and every block is one dense matmul
against that group's matrix, the tiling of Gale et al., "MegaBlocks: Efficient Sparse Training
with Mixture-of-Experts" (2022) and of JAX's megablox kernels, written as plain XLA control flow
with static shapes:

    for each group g:                                     # fori_loop over groups
      for each whole tile_m-row tile of g:                # fori_loop, trip count from group_sizes
        out[tile] = lhs[tile] @ rhs[g]
      for each smaller size s in tile_m/4, tile_m/16, ..., 8:
        c = how many whole s-row tiles of g are left      # < 4; the last size rounds up
        out[next c*s rows] = lhs[next c*s rows] @ rhs[g]  # lax.switch over c: static heights

Only the last, rounded-up block of a group can run past the group: fewer than 8 rows per group
are computed and thrown away, whatever tile_m. Its window is shifted back to stay inside the
array and the rows outside the group are masked out. Blocks read rows with dynamic slices of the
operands: no padded copy of `lhs`, no per-tile copy of `rhs`, no work after the last group.

Why blocks of several sizes rather than one size: XLA:CPU pays a fixed cost per matmul inside a
loop (it dispatches each to its thread pool), so a group should be a few large matmuls, and a
single size would either pad every group by up to a tile or cut it into many small tiles.

Loops with data-dependent trip counts are not reverse-differentiable, so `gmm_tiled` carries a
`jax.custom_vjp` whose backward pass is two more grouped loops: lhs's gradient is this grouped
matmul against rhs transposed, rhs's a per-group sum of lhs-block-transposed times dout-block.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from kernels_pallas import varying

MAX_TILE_M = 2048
MIN_TILE_M = 8
TILE_SHRINK = 4

# tile_fn(carry, *, row, height, masked) -> carry: the block of `height` rows from `row` on,
# `masked` when it may run past its group.
TileFn = Callable[..., jax.Array]


def default_tile_m(m: int, num_groups: int) -> int:
    """The largest tile: the mean group size rounded down to a power of two, in [8, 2048].

    Padding stays under MIN_TILE_M rows per group whatever the tile, so tile_m only sets how a
    group is cut into matmuls: floor(rows / tile_m) of tile_m rows, then at most one per smaller
    size. At the mean, a typical group is one or two large matmuls and a few small ones. The cap
    is where, on the benchmark shapes, larger tiles stopped being faster.
    """
    rows_per_group = max(1, m // max(1, num_groups))
    power_of_two = 1 << (rows_per_group.bit_length() - 1)  # largest one <= rows_per_group
    return min(MAX_TILE_M, max(MIN_TILE_M, power_of_two))


def tile_sizes(tile_m: int, m: int) -> tuple[int, ...]:
    """Block sizes of every group, largest first; none over m, at least one.

    tile_m, divided by TILE_SHRINK while the result stays >= MIN_TILE_M, and then MIN_TILE_M
    itself when tile_m is larger: 512 gives (512, 128, 32, 8) and 12 gives (12, 8).
    """
    sizes = [tile_m]
    while sizes[-1] // TILE_SHRINK >= MIN_TILE_M:
        sizes.append(sizes[-1] // TILE_SHRINK)
    if sizes[-1] > MIN_TILE_M:
        sizes.append(MIN_TILE_M)
    # A group never holds more than m rows, and a dynamic slice cannot be larger than its array.
    return tuple(size for size in sizes if size <= m) or (m,)


def gmm_tiled(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    tile_m: int,
    out_dtype: DTypeLike,
) -> jax.Array:
    """Grouped matmul with the contract of `jax.lax.ragged_dot`, tiled; operands pre-checked.

    Args:
      lhs: [m, k], rows sorted by group.
      rhs: [num_groups, k, n], same dtype as `lhs`.
      group_sizes: [num_groups] int32, summing to at most m.
      tile_m: largest tile, in rows; any positive int (see `tile_sizes`).
      out_dtype: output dtype; products are accumulated in at least float32.

    Returns:
      [m, n] in `out_dtype`; rows past `sum(group_sizes)` are zeros.
    """
    if lhs.shape[0] == 0 or rhs.shape[0] == 0:
        # Nothing to multiply, and a loop body indexing an empty axis would not even trace.
        return jnp.zeros((lhs.shape[0], rhs.shape[2]), out_dtype)
    return _gmm(lhs, rhs, group_sizes, tile_sizes(tile_m, lhs.shape[0]), jnp.dtype(out_dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    tiles: tuple[int, ...],
    out_dtype: jnp.dtype,
) -> jax.Array:
    return _grouped_matmul(lhs, rhs, group_sizes, tiles, out_dtype, transpose_rhs=False)


def _gmm_fwd(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    tiles: tuple[int, ...],
    out_dtype: jnp.dtype,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    out = _grouped_matmul(lhs, rhs, group_sizes, tiles, out_dtype, transpose_rhs=False)
    return out, (lhs, rhs, group_sizes)


def _gmm_bwd(
    tiles: tuple[int, ...],
    out_dtype: jnp.dtype,
    residuals: tuple[jax.Array, jax.Array, jax.Array],
    dout: jax.Array,
) -> tuple[jax.Array, jax.Array, None]:
    del out_dtype
    lhs, rhs, group_sizes = residuals
    # The operand dtype for the backward matmuls; they still accumulate in at least float32.
    dout = dout.astype(lhs.dtype)  # [m, n]
    dlhs = _grouped_matmul(dout, rhs, group_sizes, tiles, lhs.dtype, transpose_rhs=True)
    drhs = _transposed_grouped_matmul(lhs, dout, group_sizes, tiles)
    return dlhs, drhs, None  # group_sizes is integer: no cotangent


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _grouped_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    tiles: tuple[int, ...],
    out_dtype: jnp.dtype,
    *,
    transpose_rhs: bool,
) -> jax.Array:
    """[m, k] x [groups, k, n] -> [m, n], or x [groups, n, k] -> [m, n] with transpose_rhs."""
    m = lhs.shape[0]
    accumulate_dtype = jnp.promote_types(out_dtype, jnp.float32)
    # Contracting rhs's last axis multiplies by rhs[g] transposed without materialising it.
    contracting = ((1,), (1,) if transpose_rhs else (0,))
    group_ends = jnp.cumsum(group_sizes)  # [groups]

    def group_body(group: jax.Array, out: jax.Array) -> jax.Array:
        weights = rhs[group]  # [k, n], or [n, k] with transpose_rhs

        def tile_fn(out: jax.Array, *, row: jax.Array, height: int, masked: bool) -> jax.Array:
            start = jnp.minimum(row, m - height) if masked else row
            rows = jax.lax.dynamic_slice_in_dim(lhs, start, height)  # [height, k]
            product = jax.lax.dot_general(
                rows, weights, (contracting, ((), ())), preferred_element_type=accumulate_dtype
            ).astype(out_dtype)  # [height, n]
            if masked:
                # Rows outside the group keep what their own group's blocks wrote (or zeros).
                in_group = _rows_in(start, height, row, group_ends[group])  # [height]
                before = jax.lax.dynamic_slice_in_dim(out, start, height)  # [height, n]
                product = jnp.where(in_group[:, None], product, before)
            return jax.lax.dynamic_update_slice_in_dim(out, product, start, axis=0)

        group_start = group_ends[group] - group_sizes[group]
        return _fold_tiles(tile_fn, group_start, group_ends[group], tiles, m, out)

    out_columns = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out = varying.zeros_varying_like((m, out_columns), out_dtype, lhs, rhs, group_sizes)
    return jax.lax.fori_loop(0, group_sizes.shape[0], group_body, out)  # [m, n]


def _transposed_grouped_matmul(
    lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, tiles: tuple[int, ...]
) -> jax.Array:
    """[m, k] x [m, n] -> [groups, k, n]: per group, its rows of lhs transposed times dout's."""
    m, k = lhs.shape
    n = dout.shape[1]
    accumulate_dtype = jnp.promote_types(lhs.dtype, jnp.float32)
    group_ends = jnp.cumsum(group_sizes)  # [groups]

    def group_body(
        carry: None, group_bounds: tuple[jax.Array, jax.Array]
    ) -> tuple[None, jax.Array]:
        group_start, group_end = group_bounds

        def tile_fn(total: jax.Array, *, row: jax.Array, height: int, masked: bool) -> jax.Array:
            start = jnp.minimum(row, m - height) if masked else row
            rows = jax.lax.dynamic_slice_in_dim(lhs, start, height)  # [height, k]
            if masked:
                # Zeroing one operand's foreign rows removes their terms from the sum.
                in_group = _rows_in(start, height, row, group_end)  # [height]
                rows = jnp.where(in_group[:, None], rows, jnp.zeros((), rows.dtype))
            douts = jax.lax.dynamic_slice_in_dim(dout, start, height)  # [height, n]
            return total + jax.lax.dot_general(
                rows, douts, (((0,), (0,)), ((), ())), preferred_element_type=accumulate_dtype
            )  # [k, n]

        total = varying.zeros_varying_like((k, n), accumulate_dtype, lhs, dout, group_sizes)
        total = _fold_tiles(tile_fn, group_start, group_end, tiles, m, total)
        return carry, total.astype(lhs.dtype)

    group_bounds = (group_ends - group_sizes, group_ends)
    _, drhs = jax.lax.scan(group_body, None, group_bounds)  # [groups, k, n]
    return drhs


def _fold_tiles(
    tile_fn: TileFn,
    group_start: jax.Array,
    group_end: jax.Array,
    tiles: tuple[int, ...],
    m: int,
    carry: jax.Array,
) -> jax.Array:
    """Threads `carry` through tile_fn over blocks of rows covering [group_start, group_end).

    The largest size runs as a loop, one block per whole tile inside the group. Each smaller
    size then runs once, as one block of all its whole tiles that still fit (the last size: of
    as many as cover the rest, so only its block can run past the group and needs a mask). The
    size above left fewer rows than itself, so that count is small and a `lax.switch` over it
    picks a matmul of static height: one matmul per size rather than one per tile, because on
    XLA:CPU every matmul in a loop pays a fixed dispatch cost on top of its arithmetic.
    """
    row = group_start
    for level, size in enumerate(tiles):
        masked = level == len(tiles) - 1
        remaining = group_end - row
        count = (remaining + size - 1) // size if masked else remaining // size
        if level == 0:
            carry = jax.lax.fori_loop(
                0, count, functools.partial(_tile, tile_fn, row, size, masked), carry
            )
        else:
            left = tiles[level - 1] - 1  # the most rows the size above can leave
            most = -(-left // size) if masked else left // size
            # Heights are cut to the array's m rows, which still hold all the rows remaining.
            branches = [_skip] + [
                functools.partial(tile_fn, row=row, height=min(blocks * size, m), masked=masked)
                for blocks in range(1, most + 1)
            ]
            carry = jax.lax.switch(count, branches, carry)
        row = row + count * size
    return carry


def _tile(
    tile_fn: TileFn, first: jax.Array, size: int, masked: bool, index: jax.Array, carry: jax.Array
) -> jax.Array:
    """fori_loop body: tile `index` of the loop whose first tile starts at row `first`."""
    return tile_fn(carry, row=first + index * size, height=size, masked=masked)


def _skip(carry: jax.Array) -> jax.Array:
    """The switch branch for a size none of whose tiles fit: nothing to do."""
    return carry


def _rows_in(start: jax.Array, height: int, row: jax.Array, group_end: jax.Array) -> jax.Array:
    """[height] bool: which rows of the window [start, start + height) lie in [row, group_end)."""
    rows = start + jnp.arange(height)
    return (rows >= row) & (rows < group_end)
