"""The method "lottery": the mask arithmetic of the rounds of iterative magnitude pruning and
of its random-pruning control.

*The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural Networks*: train; prune
`prune_rate` of the remaining weights of each layer by magnitude (the output layer at
`output_prune_rate`); rewind the survivors to their initial values; train again; repeat. The
experiment that trains the networks, with its controls and report, is `moejax.tasks.lottery`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax.errors import require
from moejax.pruning import patterns
from moejax.pruning.base import MethodSpec, PruningOptions, register
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


# --- the registered method ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LotteryOptions(PruningOptions):
    """Options of "lottery": each round prunes `prune_rate` of every layer's remaining weights
    by magnitude (`output_prune_rate` for the weights under the top-level module
    `output_layer`); survivors rewind to their values before update `rewind_step` (0: the
    initialisation; `Pruner(rewind_step=...)` stores them)."""

    prune_rate: float = 0.2
    output_prune_rate: float = 0.1
    output_layer: str = "out"
    rewind_step: int = 0

    def __post_init__(self) -> None:
        for name in ("prune_rate", "output_prune_rate"):
            value = getattr(self, name)
            require(0.0 < value < 1.0, name, value, "in (0, 1)")
        require(self.rewind_step >= 0, "rewind_step", self.rewind_step, ">= 0")


def lottery_round(params: Any, masks: Any, *, prunable: Any, options: LotteryOptions) -> Any:
    """One round of iterative magnitude pruning on the trained `params` (`magnitude_round`
    at the options' rates); training then restarts from the rewind point under these masks."""
    del prunable  # the kernels (ParamFilter's default), as the paper prunes
    rates = layer_rates(
        params, options.prune_rate, options.output_prune_rate, output_layer=options.output_layer
    )
    return magnitude_round(params, masks, rates)


LOTTERY = register(MethodSpec("lottery", LotteryOptions, refine=lottery_round))
