"""Grouped matmul as XLA loops over row tiles: close to dense speed where ragged_dot is not.

XLA:CPU lowers `jax.lax.ragged_dot` to a dense matmul masked per group, num_groups times the
useful work. Here each group's rows are instead cut into tiles and every tile is one small dense
matmul against that group's matrix, the tiling of Gale et al., "MegaBlocks: Efficient Sparse
Training with Mixture-of-Experts" (2022) and of JAX's megablox kernels, written as plain loops:

    for each group g:                          # fori_loop, static trip count
      for each tile size t in tile_m, tile_m/2, ..., 8:
        for each tile of t rows of g:          # fori_loop, trip count read from group_sizes
          out[tile rows] = lhs[tile rows] @ rhs[g]

Each size but the last takes as many whole tiles as still fit in the group (at most one, below
the largest), and the last size covers the rest, so the rows computed and thrown away number
fewer than 8 per group, whatever tile_m is. A tile reads rows in place with a dynamic slice of
the operand: no padded copy of `lhs`, no per-tile copy of `rhs`, no tiles after the last group.
Only the final tile of a group can run past the group; its window is shifted to stay inside the
array and the rows outside the group are masked out.

Loops with data-dependent trip counts are not reverse-differentiable, so `gmm_tiled` carries a
`jax.custom_vjp` whose backward pass is two more such loops.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

MAX_TILE_M = 512
MIN_TILE_M = 8

# (carry, first row, tile size, whether the tile may run past its group and needs a mask) -> carry
TileFn = Callable[[jax.Array, jax.Array, int, bool], jax.Array]


def default_tile_m(m: int, num_groups: int) -> int:
    """The largest tile: about one average group, a power of two in [MIN_TILE_M, MAX_TILE_M].

    Padding stays under MIN_TILE_M rows per group whatever the tile, so the choice only trades
    the per-tile loop overhead (fewer, larger tiles are faster) against tile sizes that most
    groups are too small to use, each of which still costs every group an empty loop.
    """
    rows_per_group = max(1, m // max(1, num_groups))
    power_of_two = 1 << (rows_per_group.bit_length() - 1)  # largest one <= rows_per_group
    return min(MAX_TILE_M, max(MIN_TILE_M, power_of_two))


def tile_sizes(tile_m: int, m: int) -> tuple[int, ...]:
    """Tile sizes, largest first: tile_m halved down to MIN_TILE_M, none over m (at least one)."""
    sizes = [tile_m]
    while sizes[-1] // 2 >= MIN_TILE_M:
        sizes.append(sizes[-1] // 2)
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
    if lhs.shape[0] == 0:
        return jnp.zeros((0, rhs.shape[2]), out_dtype)
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

        def tile_fn(out: jax.Array, row: jax.Array, size: int, masked: bool) -> jax.Array:
            start = jnp.minimum(row, m - size) if masked else row
            rows = jax.lax.dynamic_slice_in_dim(lhs, start, size)  # [size, k]
            product = jax.lax.dot_general(
                rows, weights, (contracting, ((), ())), preferred_element_type=accumulate_dtype
            ).astype(out_dtype)  # [size, n]
            if masked:
                # Rows outside the group keep what their own group's tiles wrote (or zeros).
                in_group = _rows_in(start, size, row, group_ends[group])  # [size]
                before = jax.lax.dynamic_slice_in_dim(out, start, size)  # [size, n]
                product = jnp.where(in_group[:, None], product, before)
            return jax.lax.dynamic_update_slice_in_dim(out, product, start, axis=0)

        group_start = group_ends[group] - group_sizes[group]
        return _fold_tiles(tile_fn, group_start, group_ends[group], tiles, out)

    out_columns = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out = jnp.zeros((m, out_columns), out_dtype)
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

        def tile_fn(total: jax.Array, row: jax.Array, size: int, masked: bool) -> jax.Array:
            start = jnp.minimum(row, m - size) if masked else row
            rows = jax.lax.dynamic_slice_in_dim(lhs, start, size)  # [size, k]
            if masked:
                # Zeroing one operand's foreign rows removes their terms from the sum.
                in_group = _rows_in(start, size, row, group_end)  # [size]
                rows = jnp.where(in_group[:, None], rows, jnp.zeros((), rows.dtype))
            douts = jax.lax.dynamic_slice_in_dim(dout, start, size)  # [size, n]
            return total + jax.lax.dot_general(
                rows, douts, (((0,), (0,)), ((), ())), preferred_element_type=accumulate_dtype
            )  # [k, n]

        total = jnp.zeros((k, n), accumulate_dtype)
        total = _fold_tiles(tile_fn, group_start, group_end, tiles, total)
        return carry, total.astype(lhs.dtype)

    group_bounds = (group_ends - group_sizes, group_ends)
    _, drhs = jax.lax.scan(group_body, None, group_bounds)  # [groups, k, n]
    return drhs


def _fold_tiles(
    tile_fn: TileFn,
    group_start: jax.Array,
    group_end: jax.Array,
    tiles: tuple[int, ...],
    carry: jax.Array,
) -> jax.Array:
    """Threads `carry` through tile_fn over tiles covering rows [group_start, group_end).

    Every size but the last takes only whole tiles inside the group; the last size takes as
    many tiles as cover the rest, so only its tiles can run past the group and need a mask.
    """
    row = group_start
    for level, size in enumerate(tiles):
        masked = level == len(tiles) - 1
        remaining = group_end - row
        count = (remaining + size - 1) // size if masked else remaining // size

        # Defaults bind this level's values; fori_loop traces body before the next level anyway.
        def body(
            index: jax.Array,
            carry: jax.Array,
            first: jax.Array = row,
            size: int = size,
            masked: bool = masked,
        ) -> jax.Array:
            return tile_fn(carry, first + index * size, size, masked)

        carry = jax.lax.fori_loop(0, count, body, carry)
        row = row + count * size
    return carry


def _rows_in(start: jax.Array, size: int, row: jax.Array, group_end: jax.Array) -> jax.Array:
    """[size] bool: which rows of the window [start, start + size) lie in [row, group_end)."""
    rows = start + jnp.arange(size)
    return (rows >= row) & (rows < group_end)
