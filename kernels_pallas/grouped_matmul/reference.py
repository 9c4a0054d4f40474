"""A loop-over-groups grouped matmul in float64 numpy: the ground truth for the kernels' tests."""

import numpy as np
import numpy.typing as npt


def gmm_reference(lhs: npt.ArrayLike, rhs: npt.ArrayLike, group_sizes: npt.ArrayLike) -> np.ndarray:
    """Grouped matmul computed one group at a time, in float64.

    Args:
      lhs: [m, k], rows sorted by group.
      rhs: [num_groups, k, n], one matrix per group.
      group_sizes: [num_groups] concrete integers; group g owns the next `group_sizes[g]` rows.

    Returns:
      [m, n] float64: rows of group g multiplied by `rhs[g]`; rows past `sum(group_sizes)` are 0.
    """
    # float64 on purpose: the reference must be more accurate than anything it checks.
    lhs = np.asarray(lhs, dtype=np.float64)
    rhs = np.asarray(rhs, dtype=np.float64)
    sizes = [int(size) for size in np.asarray(group_sizes)]
    if sum(sizes) > lhs.shape[0]:
        raise ValueError(f"group_sizes: sum {sum(sizes)} exceeds the {lhs.shape[0]} rows of lhs")
    out = np.zeros((lhs.shape[0], rhs.shape[2]), dtype=np.float64)  # [m, n]
    start = 0
    for group, size in enumerate(sizes):
        out[start : start + size] = lhs[start : start + size] @ rhs[group]
        start += size
    return out
