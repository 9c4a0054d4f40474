"""Lottery-ticket pruning rounds: the mask arithmetic of iterative magnitude pruning and of its
random-pruning control.

*The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural Networks*: train; prune
`prune_rate` of the remaining weights of each layer by magnitude (the output layer at
`output_prune_rate`); rewind the survivors to their initial values; train again; repeat. The
experiment that trains the networks, with its controls and report, is `moejax.tasks.lottery`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax.pruning import patterns
from moejax.pruning.masks import ParamFilter, path_name, prunable_tree


def layer_rates(
    params: Any, prune_rate: float, output_prune_rate: float, *, output_layer: str
) -> dict[str, float]:
    """The fraction of each prunable layer's remaining weights removed per round: the weights
    under `output_layer` (a top-level module name) at `output_prune_rate`, the rest at
    `prune_rate`."""
    names = [name for name, flag in _prunable_names(params) if flag]
    return {
        name: output_prune_rate if name.startswith(output_layer + "/") else prune_rate
        for name in names
    }


def _prunable_names(params: Any) -> list[tuple[str, bool]]:
    flags = jax.tree_util.tree_leaves_with_path(prunable_tree(params, ParamFilter()))
    return [(path_name(path), flag) for path, flag in flags]


def magnitude_round(params: Any, masks: Any, rates: dict[str, float]) -> Any:
    """Prunes `rates[layer]` of each layer's surviving weights, smallest |w| first.

    params, masks: pure dicts like the model's params -> new bool masks (a subset of `masks`).
    """

    def prune(path, p, m):
        name = path_name(path)
        if name not in rates:
            return m
        remaining = int(np.sum(m))
        pruned_now = round(rates[name] * remaining)
        sparsity = (m.size - remaining + pruned_now) / m.size
        scores = patterns.masked_scores(jnp.abs(p), m)
        return patterns.unstructured_mask(scores, sparsity) & m

    return jax.tree_util.tree_map_with_path(prune, params, masks)


def random_like(masks: Any, key: jax.Array) -> Any:
    """Uniformly random masks with exactly the same number of kept weights per layer."""
    leaves, treedef = jax.tree.flatten(masks)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, m in zip(keys, leaves, strict=True):
        sparsity = 1.0 - float(np.sum(m)) / m.size
        out.append(patterns.unstructured_mask(jax.random.uniform(k, m.shape), sparsity))
    return jax.tree.unflatten(treedef, out)


def remaining_fraction(masks: Any, params: Any) -> float:
    """Kept fraction of the prunable weights (the kernels; biases are never pruned)."""
    flags = jax.tree.leaves(prunable_tree(params, ParamFilter()))
    kept = total = 0
    for m, flag in zip(jax.tree.leaves(masks), flags, strict=True):
        if flag:
            kept += int(np.sum(m))
            total += m.size
    return kept / total
