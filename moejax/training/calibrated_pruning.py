"""One-shot pruning of a trained language model's feed-forward weights from calibration text:
magnitude, Wanda or SparseGPT (`moejax.pruning.one_shot`), block after block.

Block i is calibrated on the activations of the model whose blocks before i are already pruned,
so each block learns to work with the errors of the ones before it. Routing-aware: an expert's
statistics count only the tokens its router sends it (by the layer's own `MoELayer.route`), and
an expert that receives none of the calibration tokens is pruned by magnitude (nothing to
calibrate on). Shared experts and dense MLPs see every token; routers stay dense. Within a
block, the down projections are calibrated on the hidden activations of the dense gate and up
projections. Statistics accumulate batch by batch: one block's `d_in x d_in` sums, never the
activations of all batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from moejax.errors import require
from moejax.models.moe_layer import MoELayer
from moejax.pruning.one_shot import (
    ONE_SHOT_METHODS,
    ONE_SHOT_REFINEMENTS,
    LayerStatistics,
    accumulate,
    relative_layer_error,
)
from moejax.training.calibration import ffn_inputs, swiglu_hidden

METHODS = tuple(ONE_SHOT_METHODS)
REFINEMENTS = tuple(ONE_SHOT_REFINEMENTS)
PROJECTIONS = ("w_gate", "w_up", "w_down")


def _prune(w, stats: LayerStatistics, method, sparsity, nm, refine, errors: list[float]):
    """(pruned w, kept mask) of one `[d_in, d_out]` weight, the mask refined by `refine` (a
    name of `ONE_SHOT_REFINEMENTS` or None); by magnitude, unrefined, when its inputs saw no
    calibration token (nothing to calibrate on). Appends the weight's relative output error on
    its calibration tokens to `errors` (nothing for a weight that saw none)."""
    if float(stats.tokens) == 0:
        return ONE_SHOT_METHODS["magnitude"].prune(w, stats, sparsity, nm)
    chosen = ONE_SHOT_METHODS[method]
    pruned, mask = chosen.prune(w, stats, sparsity, nm)
    if refine is not None:
        mask = ONE_SHOT_REFINEMENTS[refine](w, stats, mask, nm)
        pruned = chosen.rebuild(w, stats, mask, nm)
    errors.append(float(relative_layer_error(w, pruned, stats.hessian)))
    return pruned, mask


def prune_feed_forwards(
    model: Any,
    calibration: Sequence[np.ndarray],
    *,
    method: str,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    refine: str | None = None,
    progress: Callable[[Iterable], Iterable] = iter,
) -> dict[str, Any]:
    """Prunes every block's MLP or experts (gate, up, down; routed and shared) of `model` (a
    `TransformerLM`, changed in place) from the `calibration` token batches `[batch, length]`,
    block after block (see the module docstring); `refine` (one of `REFINEMENTS`, or None)
    refines each weight's mask before its method rebuilds the weights. Returns a report: per
    block, the mean kept share and relative output error `||X w - X w'||² / ||X w||²` (on each
    weight's own calibration inputs X) of its weights and, for MoE blocks, the calibration
    tokens each expert saw. `progress` wraps the iteration over the blocks (a progress bar)."""
    require(method in METHODS, "method", method, ", ".join(METHODS))
    require(
        refine is None or refine in REFINEMENTS, "refine", refine, f"None, {', '.join(REFINEMENTS)}"
    )
    require(len(calibration) > 0, "calibration", len(calibration), "at least one batch")
    report = {}
    for layer, block in progress(list(enumerate(model.blocks))):
        captured = [ffn_inputs(model, jnp.asarray(tokens))[layer] for tokens in calibration]
        ffn = block.ffn
        if isinstance(ffn, MoELayer):
            report[f"block{layer}"] = _prune_moe(ffn, captured, method, sparsity, nm, refine)
        else:
            weights = {name: getattr(ffn, name)[...] for name in PROJECTIONS}
            stats = _statistics(captured, weights, None)
            kept, errors = [], []
            for name in PROJECTIONS:
                pruned, mask = _prune(
                    weights[name], stats[name], method, sparsity, nm, refine, errors
                )
                getattr(ffn, name)[...] = pruned
                kept.append(float(jnp.mean(mask)))
            report[f"block{layer}"] = {
                "kept": float(np.mean(kept)),
                "layer_error": _mean(errors),
            }
    return report


def _statistics(captured, weights, expert_tokens) -> dict[str, LayerStatistics]:
    """Input statistics of gate/up (the block's input) and down (the hidden activations),
    counting the tokens `expert_tokens(index) -> [tokens] bool` selects (all when None)."""
    d_model, d_ff = weights["w_gate"].shape
    stats_in, stats_hidden = LayerStatistics.zeros(d_model), LayerStatistics.zeros(d_ff)
    for x, index in captured:
        selected = None if expert_tokens is None else expert_tokens(index)
        stats_in = accumulate(stats_in, x, selected)
        hidden = swiglu_hidden(
            x, weights["w_gate"].astype(jnp.float32), weights["w_up"].astype(jnp.float32)
        )
        stats_hidden = accumulate(stats_hidden, hidden, selected)
    return {"w_gate": stats_in, "w_up": stats_in, "w_down": stats_hidden}


def _prune_moe(ffn: MoELayer, captured, method, sparsity, nm, refine) -> dict[str, Any]:
    tokens_seen, errors = [], []
    stacked = {name: getattr(ffn, name)[...] for name in PROJECTIONS}
    pruned = {name: [] for name in PROJECTIONS}
    for expert in range(ffn.num_experts):
        weights = {name: stacked[name][expert] for name in PROJECTIONS}
        stats = _statistics(captured, weights, lambda index, e=expert: jnp.any(index == e, axis=1))
        tokens_seen.append(int(stats["w_gate"].tokens))
        for name in PROJECTIONS:
            pruned[name].append(
                _prune(weights[name], stats[name], method, sparsity, nm, refine, errors)[0]
            )
    for name in PROJECTIONS:
        getattr(ffn, name)[...] = jnp.stack(pruned[name])
    if ffn.moe.num_shared_experts:
        for shared in range(ffn.moe.num_shared_experts):
            weights = {n: getattr(ffn, f"shared_{n}")[...][shared] for n in PROJECTIONS}
            stats = _statistics(captured, weights, None)
            for name in PROJECTIONS:
                value = _prune(weights[name], stats[name], method, sparsity, nm, refine, errors)[0]
                variable = getattr(ffn, f"shared_{name}")
                variable[...] = variable[...].at[shared].set(value)
    return {"expert_tokens": tokens_seen, "layer_error": _mean(errors)}


def _mean(errors: list[float]) -> float | None:
    """The mean error of a block's weights; None when none of them saw a calibration token."""
    return float(np.mean(errors)) if errors else None
