"""Mask pytrees: applying them, choosing which parameters are prunable, measuring sparsity.

A mask tree has exactly the structure and shapes of the params tree (bool or the params'
dtype), non-prunable parameters included (all True). Same structure means the optimizer-state
sharding rule (`moejax.parallel.sharding.like_params`) shards masks like the parameters they mask.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax.errors import message, require

Params = Any
Masks = Any


def path_name(path: tuple) -> str:
    """'layers/0/moe/w_gate' for a jax key path (dict keys, sequence indices, attributes)."""
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class ParamFilter:
    """Which parameters are prunable: the '/'-joined path matches `regex` (re.search) and the
    array has at least `min_ndim` dims (so biases and norm scales are left dense)."""

    regex: str = ".*"
    min_ndim: int = 2

    def __post_init__(self) -> None:
        try:
            re.compile(self.regex)
        except re.error as error:
            raise ValueError(message("regex", self.regex, f"a valid regex ({error})")) from None
        require(self.min_ndim >= 0, "min_ndim", self.min_ndim, ">= 0")

    def __call__(self, name: str, leaf: Any) -> bool:
        return np.ndim(leaf) >= self.min_ndim and re.search(self.regex, name) is not None


def prunable_tree(params: Params, param_filter: Callable[[str, Any], bool]) -> Any:
    """A tree of Python bools like `params`: True where `param_filter(path_name, leaf)`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: bool(param_filter(path_name(path), leaf)), params
    )


def ones_masks(params: Params, dtype: Any = jnp.bool_) -> Masks:
    """All-kept masks: a tree like `params` of ones (bool by default)."""
    return jax.tree.map(lambda p: jnp.ones(jnp.shape(p), dtype), params)


def apply_masks(params: Params, masks: Masks) -> Params:
    """Zeroes the pruned entries: `where(mask, param, 0)` leaf by leaf (shapes equal).

    Pure and jit-friendly; `where` rather than a product so that a non-finite pruned value does
    not leak through as NaN.
    """
    return jax.tree.map(
        lambda p, m: jnp.where(m.astype(bool), p, jnp.zeros((), p.dtype)), params, masks
    )


def sparsity_report(tree: Params | Masks) -> dict[str, float]:
    """Fraction of zero (pruned) entries per leaf, keyed by path name, plus "total" over all
    leaves. Works on masks (False = pruned) and on params (exact zeros count as pruned)."""
    report: dict[str, float] = {}
    zeros = size = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        leaf = np.asarray(leaf)
        leaf_zeros = int(leaf.size - np.count_nonzero(leaf))
        report[path_name(path)] = leaf_zeros / max(leaf.size, 1)
        zeros += leaf_zeros
        size += leaf.size
    report["total"] = zeros / max(size, 1)
    return report


def masked_sparsity(masks: Masks, prunable: Any) -> jax.Array:
    """Fraction of pruned entries among the prunable ones (a traced scalar, for logging in jit).
    prunable: a tree of Python bools like masks (`prunable_tree`)."""
    pruned = total = 0
    for mask, is_prunable in zip(jax.tree.leaves(masks), jax.tree.leaves(prunable), strict=True):
        if is_prunable:
            pruned = pruned + jnp.sum(~mask.astype(bool))
            total += mask.size
    return jnp.asarray(pruned, jnp.float32) / max(total, 1)
