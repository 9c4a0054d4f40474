"""Grouped matmul references: float64 numpy loops (ground truth) and a differentiable jnp one."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt


def _local_rows(group_sizes: npt.ArrayLike, m: int, group_offset: int, num_local: int) -> list:
    """[(start, end)] rows of local groups group_offset .. group_offset + num_local - 1."""
    sizes = [int(size) for size in np.asarray(group_sizes)]
    if sum(sizes) > m:
        raise ValueError(f"group_sizes: sum {sum(sizes)} exceeds the {m} rows of lhs")
    if not 0 <= group_offset <= len(sizes) - num_local:
        raise ValueError(
            f"group_offset: got {group_offset}; allowed: 0 to {len(sizes) - num_local} for "
            f"{num_local} local groups out of {len(sizes)}"
        )
    ends = np.cumsum([0, *sizes])
    return [(ends[g], ends[g + 1]) for g in range(group_offset, group_offset + num_local)]


def gmm_reference(
    lhs: npt.ArrayLike, rhs: npt.ArrayLike, group_sizes: npt.ArrayLike, group_offset: int = 0
) -> np.ndarray:
    """Grouped matmul computed one group at a time, in float64.

    Args:
      lhs: [m, k], rows sorted by group.
      rhs: [num_local, k, n], the matrices of groups group_offset .. group_offset + num_local - 1.
      group_sizes: [num_groups] concrete integers; group g owns the next `group_sizes[g]` rows.
      group_offset: the first group rhs holds.

    Returns:
      [m, n] float64: rows of local group g multiplied by `rhs[g]`; all other rows are 0.
    """
    # float64 on purpose: the reference must be more accurate than anything it checks.
    lhs = np.asarray(lhs, dtype=np.float64)
    rhs = np.asarray(rhs, dtype=np.float64)
    out = np.zeros((lhs.shape[0], rhs.shape[2]), dtype=np.float64)  # [m, n]
    for group, (start, end) in enumerate(
        _local_rows(group_sizes, lhs.shape[0], group_offset, rhs.shape[0])
    ):
        out[start:end] = lhs[start:end] @ rhs[group]
    return out


def tgmm_reference(
    lhs: npt.ArrayLike,
    dout: npt.ArrayLike,
    group_sizes: npt.ArrayLike,
    group_offset: int = 0,
    num_local: int | None = None,
) -> np.ndarray:
    """Per local group, its rows of lhs transposed times its rows of dout, in float64.

    Args:
      lhs: [m, k], rows sorted by group.
      dout: [m, n].
      group_sizes: [num_groups] concrete integers.
      group_offset: the first local group.
      num_local: local groups; defaults to all from group_offset on.

    Returns:
      [num_local, k, n] float64; zeros for a group with no rows.
    """
    lhs = np.asarray(lhs, dtype=np.float64)
    dout = np.asarray(dout, dtype=np.float64)
    if num_local is None:
        num_local = len(np.asarray(group_sizes)) - group_offset
    rows = _local_rows(group_sizes, lhs.shape[0], group_offset, num_local)
    out = np.zeros((num_local, lhs.shape[1], dout.shape[1]), dtype=np.float64)
    for group, (start, end) in enumerate(rows):
        out[group] = lhs[start:end].T @ dout[start:end]
    return out


def gmm_dense_reference(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, group_offset: int = 0
) -> jax.Array:
    """Every row times every local group's matrix, masked to its own group: differentiable.

    O(num_local * m * k * n) work, for gradient checks with `jax.grad` on small shapes.

    Args:
      lhs: [m, k]; rhs: [num_local, k, n]; group_sizes: [num_groups] int;
      group_offset: the first group rhs holds.

    Returns:
      [m, n] in lhs's dtype, the same values as `gmm_reference`.
    """
    group_ends = jnp.cumsum(group_sizes)
    group_starts = group_ends - group_sizes
    local = slice(group_offset, group_offset + rhs.shape[0])
    rows = jnp.arange(lhs.shape[0])
    member = (rows >= group_starts[local, None]) & (rows < group_ends[local, None])  # [g, m]
    return jnp.einsum("gm,mk,gkn->mn", member.astype(lhs.dtype), lhs, rhs)
