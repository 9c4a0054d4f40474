"""Block mask -> padded lists of visited block indices, the form every implementation walks.

For each (batch, head, query block) row of the block mask the kernels need the kv blocks to
visit, in increasing order, padded to a static length `max_kv_blocks`, plus how many of them are
real. The padding repeats the last real index: a TPU pipeline that sees the same block index
twice in a row skips the copy, so padded steps cost no memory traffic (the same trick as the
mask info of JAX's splash attention; this is our own code).

The backward pass of k and v walks the mask the other way round: per kv block, the query blocks
that visit it. `transpose_block_mask` followed by `visit_lists` gives those lists.

`max_kv_blocks` is a static bound. `static_max_visits` computes it when the mask is concrete
host data; for a traced mask (built under jit, e.g. top-k routed blocks) it is the caller's
promise: rows with more visited blocks keep only their first `max_kv_blocks`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class VisitLists(NamedTuple):
    """Padded visit lists of a block mask [b, h, rows, cols] (b, h may be 1 for broadcast).

    indices: int32 [b, h, rows, max_visits]: visited columns, increasing; padding repeats the
      last real one (or 0 when a row visits nothing).
    counts: int32 [b, h, rows]: how many entries of `indices` are real.
    """

    indices: jax.Array
    counts: jax.Array


def is_concrete(x: object) -> bool:
    """True when `x` holds values now (numpy or a committed jax array), not a tracer."""
    return not isinstance(x, jax.core.Tracer)


def static_max_visits(block_mask: object) -> int | None:
    """The largest number of True entries along the last axis, or None for a traced mask."""
    if not is_concrete(block_mask):
        return None
    mask = np.asarray(block_mask, dtype=bool)
    return int(mask.sum(axis=-1).max()) if mask.size else 0


def visit_lists(block_mask: jax.Array, max_visits: int) -> VisitLists:
    """Per row of `block_mask` [b, h, rows, cols], its True columns padded to `max_visits`.

    A stable sort of the negated mask puts the True columns first, in increasing order; the
    first `max_visits` of them are kept. Works on traced masks; linear in the mask's size
    times log(cols), which is negligible next to the attention itself. A concrete mask (numpy,
    or a jax array that is not a tracer) is sorted in numpy: under jit a sort of a constant
    would be constant-folded by XLA at compile time, which takes seconds for large masks.
    """
    cols = block_mask.shape[-1]
    max_visits = max(1, min(max_visits, cols))  # a zero-length axis would not index anything
    if is_concrete(block_mask):
        return _host_visit_lists(np.asarray(block_mask, dtype=bool), max_visits)
    order = jnp.argsort(~block_mask, axis=-1, stable=True)[..., :max_visits].astype(jnp.int32)
    counts = jnp.minimum(jnp.sum(block_mask, axis=-1, dtype=jnp.int32), max_visits)
    slots = jnp.arange(max_visits, dtype=jnp.int32)
    last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
    last = jnp.where(counts[..., None] > 0, last, 0)
    indices = jnp.where(slots < counts[..., None], order, last)
    return VisitLists(indices=indices, counts=counts)


def _host_visit_lists(block_mask: np.ndarray, max_visits: int) -> VisitLists:
    """`visit_lists` of a host mask, same layout, computed in numpy."""
    order = np.argsort(~block_mask, axis=-1, kind="stable")[..., :max_visits].astype(np.int32)
    counts = np.minimum(block_mask.sum(axis=-1), max_visits).astype(np.int32)
    last = np.take_along_axis(order, np.maximum(counts - 1, 0)[..., None], axis=-1)
    last = np.where(counts[..., None] > 0, last, 0)
    slots = np.arange(max_visits, dtype=np.int32)
    indices = np.where(slots < counts[..., None], order, last).astype(np.int32)
    return VisitLists(indices=jnp.asarray(indices), counts=jnp.asarray(counts))


def transpose_block_mask(block_mask: jax.Array) -> jax.Array:
    """[b, h, q_blocks, kv_blocks] -> [b, h, kv_blocks, q_blocks]."""
    return jnp.swapaxes(block_mask, -1, -2)
