"""Group metadata for the Pallas kernels: which row tiles each grid step works on, and for whom.

Groups are contiguous runs of rows, so a row tile of `tm` rows can straddle several groups. The
kernels visit such a tile once per group it holds, each visit computing the tile against that
group's matrix and keeping only the group's rows (a row mask from the group's row range). This is
the scheme of Gale et al., "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts" (2022),
and of JAX's megablox kernels; here every output tile is also visited at least once, so that rows
of no local group come out as zeros without a second pass.

Only the local groups `[group_offset, group_offset + num_local)` of the global `group_sizes` are
computed (expert sharding): their row range is where they sit among all groups, and the rows of
every other group belong to no visit.

All functions are pure jnp on traced group sizes, with static output shapes.
"""

import jax
import jax.numpy as jnp


def local_group_bounds(
    group_sizes: jax.Array, group_offset: jax.Array, num_local: int, m: int
) -> tuple[jax.Array, jax.Array]:
    """Row ranges `[starts[g], ends[g])` of the local groups, clipped to the m rows.

    Args:
      group_sizes: [num_groups_total] int32.
      group_offset: [] int32, the first local group.
      num_local: how many groups from `group_offset` on are local (rhs's leading size).
      m: rows of lhs; groups running past it are cut there (sums over m are a broken promise).

    Returns:
      starts, ends: [num_local] int32 each, nondecreasing.
    """
    ends_all = jnp.cumsum(group_sizes, dtype=jnp.int32)  # [num_groups_total]
    starts_all = ends_all - group_sizes
    starts = jax.lax.dynamic_slice_in_dim(starts_all, group_offset, num_local)  # [num_local]
    ends = jax.lax.dynamic_slice_in_dim(ends_all, group_offset, num_local)
    return jnp.clip(starts, 0, m), jnp.clip(ends, 0, m)


def _tiles_per_group(starts: jax.Array, ends: jax.Array, tm: int) -> jax.Array:
    """[groups] int32: how many tm-row tiles each group's rows touch (0 for an empty group)."""
    return jnp.where(ends > starts, (ends - 1) // tm - starts // tm + 1, 0)


def row_tile_visits(
    starts: jax.Array, ends: jax.Array, m_tiles: int, tm: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Visits for a kernel whose output is tiled by rows (gmm): every tile at least once.

    The visits, in order: the tiles before the first local row (no group), then each local
    group's tiles in row order (a tile shared by two groups appears once for each, back to back),
    then the tiles after the last local row (no group), then padding that repeats the last tile
    with no rows. A tile's visits are consecutive, so its output block stays resident across them.
    With G = len(starts) >= 1 groups, at most m_tiles + G - 1 visits are needed: tiles plus
    the shared ones, one fewer than the groups; that static bound is the grid size.

    Args:
      starts, ends: [G] int32 local group row ranges (`local_group_bounds`), G >= 1.
      m_tiles: number of row tiles, ceil(m / tm) >= 1.
      tm: rows per tile.

    Returns:
      tile_ids: [V] int32 row tile of each visit, nondecreasing.
      group_ids: [V] int32 local group whose matrix the visit reads; always a valid index.
      row_starts, row_ends: [V] int32 rows the visit owns; empty (0, 0) for visits of no group.
    """
    num_groups = starts.shape[0]
    num_visits = m_tiles + num_groups - 1
    has_rows = ends[-1] > starts[0]
    lead = jnp.where(has_rows, starts[0] // tm, m_tiles)  # tiles before the local rows
    trail_start = jnp.where(has_rows, (ends[-1] - 1) // tm + 1, m_tiles)  # first tile after
    counts = _tiles_per_group(starts, ends, tm)  # [G]
    visit_ends = lead + jnp.cumsum(counts)  # [G], one past each group's last visit
    group_visits_end = visit_ends[-1]

    visit = jnp.arange(num_visits, dtype=jnp.int32)  # [V]
    group = jnp.minimum(jnp.searchsorted(visit_ends, visit, side="right"), num_groups - 1)
    group = group.astype(jnp.int32)
    in_group = (visit >= lead) & (visit < group_visits_end)
    group_tile = starts[group] // tm + visit - (visit_ends[group] - counts[group])
    after_tile = jnp.minimum(trail_start + visit - group_visits_end, m_tiles - 1)
    tile_ids = jnp.where(visit < lead, visit, jnp.where(in_group, group_tile, after_tile))
    # Visits of no group read the nearest group's matrix: valid, and often no new fetch.
    group_ids = jnp.where(visit < lead, 0, group)
    row_starts = jnp.where(in_group, starts[group], 0)
    row_ends = jnp.where(in_group, ends[group], 0)
    return tile_ids.astype(jnp.int32), group_ids, row_starts, row_ends


def group_tile_visits(
    starts: jax.Array, ends: jax.Array, m_tiles: int, tm: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Visits for a kernel whose output is one block per group (tgmm): every group at least once.

    Each group visits the tiles its rows touch, in order; an empty group gets one visit with no
    rows, so that its output block is still written (as zeros). Padding repeats the last group
    with no rows. A group's visits are consecutive. The nonempty groups need at most
    m_tiles + G_nonempty - 1 visits (see `row_tile_visits`) and each empty one needs one, so
    m_tiles + G - 1 is again the static bound.

    Args:
      starts, ends: [G] int32 local group row ranges (`local_group_bounds`), G >= 1.
      m_tiles: number of row tiles, ceil(m / tm) >= 1.
      tm: rows per tile.

    Returns:
      tile_ids, group_ids, row_starts, row_ends: [V] int32 as in `row_tile_visits`; here
      group_ids is nondecreasing.
    """
    num_groups = starts.shape[0]
    num_visits = m_tiles + num_groups - 1
    counts = jnp.maximum(_tiles_per_group(starts, ends, tm), 1)  # [G]
    visit_ends = jnp.cumsum(counts)  # [G]

    visit = jnp.arange(num_visits, dtype=jnp.int32)  # [V]
    group = jnp.minimum(jnp.searchsorted(visit_ends, visit, side="right"), num_groups - 1)
    group = group.astype(jnp.int32)
    padding = visit >= visit_ends[-1]
    first_tile = jnp.minimum(starts[group] // tm, m_tiles - 1)
    tile_ids = first_tile + visit - (visit_ends[group] - counts[group])
    tile_ids = jnp.where(padding, m_tiles - 1, tile_ids)
    row_starts = jnp.where(padding, 0, starts[group])
    row_ends = jnp.where(padding, 0, ends[group])
    return tile_ids.astype(jnp.int32), group, row_starts, row_ends


def tile_group_ranges(
    starts: jax.Array, ends: jax.Array, m_tiles: int, tm: int
) -> tuple[jax.Array, jax.Array]:
    """For each row tile, the run of local groups whose rows it holds (empty groups skipped).

    Args:
      starts, ends: [G] int32 local group row ranges (`local_group_bounds`).
      m_tiles: number of row tiles.
      tm: rows per tile.

    Returns:
      first_group: [m_tiles] int32, the first local group with rows in the tile.
      num_groups: [m_tiles] int32, how many consecutive groups from there have rows in it
        (0 for a tile of no local group). An empty group inside the run is counted; its row
        range is empty, so the kernel skips it.
    """
    tile_start = jnp.arange(m_tiles, dtype=jnp.int32) * tm  # [m_tiles]
    # Groups are sorted by row, so those touching a tile form one run: ends past the tile's start,
    # starts before its end. An empty group strictly inside a tile lands in the run too.
    first = jnp.searchsorted(ends, tile_start, side="right")
    stop = jnp.searchsorted(starts, tile_start + tm, side="left")
    return first.astype(jnp.int32), jnp.maximum(stop - first, 0).astype(jnp.int32)
