"""The Pallas kernels' group metadata, replayed in numpy against each row's true group."""

import functools

import jax
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_pallas.grouped_matmul import metadata

ROWS = 40  # one m for all draws, so each static shape compiles once; tails vary with the sizes


@st.composite
def local_problems(draw: st.DrawFn) -> tuple[list[int], int, int, int, int]:
    """Five global group sizes (zeros allowed) in ROWS rows, the local range, and a row tile.

    The last group sometimes takes the trailing rows, so that the groups fill all ROWS rows.
    """
    group_sizes = draw(st.lists(st.integers(0, 8), min_size=5, max_size=5))
    if draw(st.booleans()):
        group_sizes[-1] += ROWS - sum(group_sizes)
    num_local = draw(st.sampled_from([1, 3, 5]))
    group_offset = draw(st.integers(0, 5 - num_local))
    tm = draw(st.sampled_from([3, 8]))
    return group_sizes, ROWS - sum(group_sizes), group_offset, num_local, tm


def _bounds_and_tiles(problem: tuple) -> tuple[np.ndarray, np.ndarray, int, int, np.ndarray]:
    """Local row ranges, padded rows, row tiles, and each row's local group (-1: none)."""
    group_sizes, tail, group_offset, num_local, tm = problem
    m = sum(group_sizes) + tail
    m_tiles = max(1, -(-m // tm))
    starts, ends = _local_group_bounds(
        np.asarray(group_sizes, np.int32), np.int32(group_offset), num_local, m
    )
    owner = np.full(m_tiles * tm, -1)
    row = sum(group_sizes[:group_offset])
    for local, size in enumerate(group_sizes[group_offset : group_offset + num_local]):
        owner[row : row + size] = local
        row += size
    return np.asarray(starts), np.asarray(ends), m_tiles, tm, owner


@functools.partial(jax.jit, static_argnums=(2, 3))
def _local_group_bounds(group_sizes, group_offset, num_local, m):
    return metadata.local_group_bounds(group_sizes, group_offset, num_local, m)


@settings(max_examples=30, deadline=None)
@given(local_problems())
def test_row_tile_visits_give_every_row_its_group_and_every_tile_a_first_visit(
    problem: tuple,
) -> None:
    starts, ends, m_tiles, tm, owner = _bounds_and_tiles(problem)
    visits = jax.jit(metadata.row_tile_visits, static_argnums=(2, 3))(starts, ends, m_tiles, tm)
    tile_ids, group_ids, row_starts, row_ends = map(np.asarray, visits)
    assert len(tile_ids) == m_tiles + len(starts) - 1
    assert np.all(np.diff(tile_ids) >= 0), "a tile's visits must be consecutive"
    assert np.all((group_ids >= 0) & (group_ids < len(starts)))
    # Replay the kernel's stores: a first visit owns its whole tile, later ones their rows.
    computed = np.full(m_tiles * tm, -2)
    pairs = set()
    for v, tile in enumerate(tile_ids):
        rows = np.arange(tile * tm, (tile + 1) * tm)
        if v == 0 or tile_ids[v - 1] != tile:
            computed[rows] = -1
        mine = rows[(rows >= row_starts[v]) & (rows < row_ends[v])]
        if mine.size:
            assert (row_starts[v], row_ends[v]) == (starts[group_ids[v]], ends[group_ids[v]])
            assert (tile, group_ids[v]) not in pairs, "a tile computed twice for one group"
            pairs.add((tile, group_ids[v]))
            computed[mine] = group_ids[v]
    np.testing.assert_array_equal(computed, owner)


@settings(max_examples=30, deadline=None)
@given(local_problems())
def test_group_tile_visits_sum_each_group_over_exactly_its_rows(problem: tuple) -> None:
    starts, ends, m_tiles, tm, owner = _bounds_and_tiles(problem)
    visits = jax.jit(metadata.group_tile_visits, static_argnums=(2, 3))(starts, ends, m_tiles, tm)
    tile_ids, group_ids, row_starts, row_ends = map(np.asarray, visits)
    assert len(tile_ids) == m_tiles + len(starts) - 1
    assert np.all(np.diff(group_ids) >= 0), "a group's visits must be consecutive"
    assert np.all((tile_ids >= 0) & (tile_ids < m_tiles))
    # Replay the kernel: reset at a group's first visit, store at its last.
    stored: dict[int, list[int]] = {}
    rows_seen: list[int] = []
    for v, (tile, group) in enumerate(zip(tile_ids, group_ids, strict=True)):
        if v == 0 or group_ids[v - 1] != group:
            rows_seen = []
        rows = np.arange(tile * tm, (tile + 1) * tm)
        rows_seen += list(rows[(rows >= row_starts[v]) & (rows < row_ends[v])])
        if v == len(tile_ids) - 1 or group_ids[v + 1] != group:
            stored[int(group)] = rows_seen
    assert sorted(stored) == list(range(len(starts))), "every group's block must be stored"
    for group, rows in stored.items():
        assert sorted(rows) == list(np.flatnonzero(owner == group)), f"group {group}"


@settings(max_examples=30, deadline=None)
@given(local_problems())
def test_tile_group_ranges_hold_every_group_with_rows_in_the_tile(problem: tuple) -> None:
    starts, ends, m_tiles, tm, owner = _bounds_and_tiles(problem)
    ranges = jax.jit(metadata.tile_group_ranges, static_argnums=(2, 3))(starts, ends, m_tiles, tm)
    first, count = map(np.asarray, ranges)
    for tile in range(m_tiles):
        run = range(first[tile], first[tile] + count[tile])
        assert run.stop <= len(starts)
        groups_in_tile = set(owner[tile * tm : (tile + 1) * tm]) - {-1}
        assert groups_in_tile <= set(run), f"tile {tile} misses a group"
        for group in run:  # the rest of the run is empty groups, which the kernel skips
            assert group in groups_in_tile or starts[group] == ends[group]
