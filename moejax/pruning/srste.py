"""The method "srste": N:M sparse training from scratch with SR-STE, progressive gradient-flow
decay, and SAD.

*Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch*: the dense weights W
are kept and trained; the forward pass uses W ⊙ M with M the N:M mask of |W| recomputed every
step; the gradient goes straight through to all of W, plus the sparse-refined term
λ (1 − M) ⊙ W that pulls pruned weights towards zero (SR-STE).

*Progressive Gradient Flow for Robust N:M Sparsity Training in Transformers*: the gradient that
reaches pruned weights is scaled by a factor β that decays from 1 to 0 over training, so late in
training the pruned weights stop moving and the mask settles.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from moejax.errors import require
from moejax.pruning.base import MethodSpec, PruningOptions, register
from moejax.pruning.masks import path_name
from moejax.pruning.patterns import nm_mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def srste_sparsify(
    w: jax.Array, n: int, m: int, axis: int, decay: jax.Array, flow: jax.Array
) -> jax.Array:
    """W ⊙ M with M = nm_mask(|W|, n, m, axis); the backward pass is SR-STE's.

    w: any shape with `w.shape[axis] % m == 0` -> same shape. decay: λ of the refine term
    (SR-STE uses 2e-4); flow: β, the fraction of the gradient that reaches pruned weights
    (1 for SR-STE, decayed for progressive gradient flow). dL/dW = (M + β (1 − M)) ⊙ g +
    λ (1 − M) ⊙ W, and no gradient to `decay` or `flow`.
    """
    return jnp.where(nm_mask(jnp.abs(w), n, m, axis), w, jnp.zeros((), w.dtype))


def _srste_fwd(w, n, m, axis, decay, flow):
    mask = nm_mask(jnp.abs(w), n, m, axis)
    return jnp.where(mask, w, jnp.zeros((), w.dtype)), (w, mask, decay, flow)


def _srste_bwd(n, m, axis, residuals, g):
    del n, m, axis
    w, mask, decay, flow = residuals
    pruned = (~mask).astype(w.dtype)
    scale = 1.0 - pruned * (1.0 - flow.astype(w.dtype))
    dw = scale * g + decay.astype(w.dtype) * pruned * w
    return dw, jnp.zeros_like(decay), jnp.zeros_like(flow)


srste_sparsify.defvjp(_srste_fwd, _srste_bwd)


def srste_params(
    params: Any,
    prunable: Any,
    *,
    n: int,
    m: int,
    axis: int = 0,
    decay: float | jax.Array = 2e-4,
    flow: float | jax.Array = 1.0,
) -> Any:
    """The params the forward pass uses: every prunable leaf through `srste_sparsify`, the
    others unchanged. prunable: a tree of Python bools like params (`prunable_tree`). Call it
    inside the loss so that `jax.grad` gives SR-STE gradients for the dense params."""
    decay = jnp.asarray(decay, jnp.float32)
    flow = jnp.asarray(flow, jnp.float32)
    return jax.tree.map(
        lambda p, keep: srste_sparsify(p, n, m, axis, decay, flow) if keep else p,
        params,
        prunable,
    )


def gradient_flow_decay(
    step: jax.Array | int, *, begin: int, end: int, intervals: int = 10
) -> jax.Array:
    """β at `step`: 1 before `begin`, 0 from `end` on, and in between a staircase of
    `intervals` equal drops (the paper decays in steps at fixed intervals)."""
    require(end > begin, "end", end, f"> begin={begin}")
    require(intervals >= 1, "intervals", intervals, ">= 1")
    progress = (jnp.asarray(step, jnp.float32) - begin) / (end - begin)
    stairs = jnp.floor(jnp.clip(progress, 0.0, 1.0) * intervals) / intervals
    return 1.0 - stairs


def nm_masks(params: Any, prunable: Any, *, n: int, m: int, axis: int = 0) -> Any:
    """The N:M masks SR-STE's forward pass uses now (all True for non-prunable leaves)."""
    return jax.tree.map(
        lambda p, keep: nm_mask(jnp.abs(p), n, m, axis) if keep else jnp.ones(p.shape, bool),
        params,
        prunable,
    )


def sparse_architecture_divergence(masks_before: Any, masks_after: Any) -> dict[str, float]:
    """SAD: how many mask entries flipped between two mask trees (same structure).

    *Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch.* Returns
    {"<path>": flips / size, ..., "total": all flips / all entries, "flips": all flips}.
    """
    report: dict[str, float] = {}
    flips = size = 0
    pairs = zip(
        jax.tree_util.tree_leaves_with_path(masks_before),
        jax.tree.leaves(masks_after),
        strict=True,
    )
    for (path, before), after in pairs:
        changed = int(jnp.sum(before.astype(bool) != after.astype(bool)))
        report[path_name(path)] = changed / max(before.size, 1)
        flips += changed
        size += before.size
    report["total"] = flips / max(size, 1)
    report["flips"] = float(flips)
    return report


# --- the registered method ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SRSTEOptions(PruningOptions):
    """Options of "srste" (the n:m groups are the "nm" pattern's options).

    decay: λ of the refine term λ (1 − M) ⊙ W that pulls pruned weights towards zero.
    flow_begin, flow_end, flow_intervals: *Progressive Gradient Flow for Robust N:M Sparsity
    Training in Transformers*: the gradient share reaching pruned weights decays from 1 to 0 in
    `flow_intervals` stairs between these steps; flow_end <= flow_begin (the default) keeps it
    at 1.
    """

    decay: float = 2e-4
    flow_begin: int = 0
    flow_end: int = 0
    flow_intervals: int = 10

    def __post_init__(self) -> None:
        require(self.decay >= 0, "decay", self.decay, ">= 0")
        require(self.flow_intervals >= 1, "flow_intervals", self.flow_intervals, ">= 1")


def flow(step: jax.Array, options: SRSTEOptions) -> jax.Array:
    """β of progressive gradient flow at `step` (1 when the decay is off)."""
    if options.flow_end <= options.flow_begin:
        return jnp.float32(1.0)
    return gradient_flow_decay(
        step, begin=options.flow_begin, end=options.flow_end, intervals=options.flow_intervals
    )


def _forward(params, masks, *, step, pruner, prunable, options: SRSTEOptions):
    del masks  # the mask is recomputed from |W| inside `srste_sparsify`
    nm = pruner.pattern_options
    return srste_params(
        params,
        prunable,
        n=nm.n,
        m=nm.m,
        axis=nm.axis,
        decay=options.decay,
        flow=flow(step, options),
    )


def _optimizer_masks(masks, *, params, options):
    # The dense weights train: the optimizer wrapper must not zero the pruned ones.
    del masks, options
    return jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)


def _record(masks, *, params, pruner, prunable, options):
    # The n:m masks of the new weights, the ones the next forward pass uses.
    del masks, options
    nm = pruner.pattern_options
    return nm_masks(params, prunable, n=nm.n, m=nm.m, axis=nm.axis)


SRSTE = register(
    MethodSpec(
        "srste",
        SRSTEOptions,
        forward=_forward,
        optimizer_masks=_optimizer_masks,
        record=_record,
        requires={"pattern": "nm", "score": "magnitude", "schedule": "none"},
    )
)
