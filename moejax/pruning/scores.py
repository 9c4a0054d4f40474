"""Pruning scores (higher = more important) and layer-wise density allocations.

Scores are float32 arrays shaped like the weight they rank; a pattern (`patterns.py`) turns them
into a mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from moejax.errors import require
from moejax.pruning.base import PruningOptions, ScoreSpec, register


def magnitude_scores(w: jax.Array) -> jax.Array:
    """|w| in float32. w: any shape -> same shape."""
    return jnp.abs(w.astype(jnp.float32))


def random_scores(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """I.i.d. uniform scores: with any pattern, a uniformly random mask of that pattern."""
    return jax.random.uniform(key, tuple(shape), jnp.float32)


def snip_scores(grads: Any, params: Any) -> Any:
    """Connection sensitivity |g * w| for every leaf.

    *SNIP: Single-shot Network Pruning based on Connection Sensitivity.* grads: the gradient of
    the loss on a batch at initialisation, a tree like params.
    """
    return jax.tree.map(
        lambda g, w: jnp.abs(g.astype(jnp.float32) * w.astype(jnp.float32)), grads, params
    )


def snip_scores_from_loss(loss_fn: Callable[[Any], jax.Array], params: Any) -> Any:
    """`snip_scores` with the gradient of `loss_fn(params) -> scalar` taken here."""
    return snip_scores(jax.grad(loss_fn)(params), params)


def wanda_scores(w: jax.Array, x: jax.Array) -> jax.Array:
    """|W_ij| * ||X_i||_2: weight magnitude times the norm of its input feature.

    *A Simple and Effective Pruning Approach for Large Language Models* (Wanda). w: [d_in,
    d_out] (Flax kernel layout), x: [tokens, d_in] calibration inputs -> [d_in, d_out]. Wanda
    compares scores per output, so use `unstructured_mask(..., per_slice_axis=1)`.
    """
    if w.ndim != 2 or x.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(
            f"w: expected [d_in, d_out] and x: [tokens, d_in], got {w.shape} and {x.shape}."
        )
    input_norm = jnp.linalg.norm(x.astype(jnp.float32), axis=0)  # [d_in]
    return jnp.abs(w.astype(jnp.float32)) * input_norm[:, None]


def _check_density(density: float | jax.Array) -> None:
    require(
        not isinstance(density, int | float) or 0.0 < density <= 1.0,
        "density",
        density,
        "in (0, 1]",
    )


def _erk_raw(shape: Sequence[int]) -> float:
    """ERK's unnormalised density: sum of dims / product of dims (Erdos-Renyi for dense layers,
    its kernel extension for conv layers)."""
    return sum(shape) / math.prod(shape)


def erk_densities(shapes: Sequence[Sequence[int]], density: float | jax.Array) -> jax.Array:
    """Per-layer densities [layers] in ERK proportions keeping `density * total` weights.

    *The Unreasonable Effectiveness of Random Pruning* (ratio schemes; ERK from *Rigging the
    Lottery*). density_l = eps * (sum dims_l / prod dims_l), with eps fixed by the target count.
    A layer whose density would exceed 1 is kept dense and eps is solved again for the rest.
    `density` may be traced (a schedule inside jit): the loop runs a static number of passes.
    """
    _check_density(density)
    sizes = jnp.array([math.prod(s) for s in shapes], jnp.float32)  # [layers]
    raw = jnp.array([_erk_raw(s) for s in shapes], jnp.float32)  # [layers]
    target = jnp.asarray(density, jnp.float32) * jnp.sum(sizes)

    def scale(dense: jax.Array) -> jax.Array:
        budget = target - jnp.sum(jnp.where(dense, sizes, 0.0))
        weight = jnp.sum(jnp.where(dense, 0.0, raw * sizes))
        return budget / jnp.maximum(weight, 1e-30)

    dense = jnp.zeros(len(shapes), bool)
    # Each pass either adds a layer to the dense set or changes nothing, so len(shapes) passes
    # reach the fixed point.
    for _ in range(len(shapes)):
        dense = dense | (scale(dense) * raw > 1.0)
    return jnp.where(dense, 1.0, jnp.minimum(scale(dense) * raw, 1.0))


def uniform_densities(shapes: Sequence[Sequence[int]], density: float | jax.Array) -> jax.Array:
    """Every layer at the same density: [layers]."""
    _check_density(density)
    return jnp.full(len(shapes), density, jnp.float32)


# --- the registered scores ---------------------------------------------------------------


def magnitude_tree(*, params: Any, options: PruningOptions) -> Any:
    """|w| of every leaf."""
    del options
    return jax.tree.map(magnitude_scores, params)


def random_tree(*, params: Any, key: jax.Array, options: PruningOptions) -> Any:
    """I.i.d. uniform scores for every leaf, one key per leaf."""
    del options
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [random_scores(k, jnp.shape(p)) for k, p in zip(keys, leaves, strict=True)]
    )


def snip_tree(*, params: Any, grads: Any, options: PruningOptions) -> Any:
    """|g * w| of every leaf with the gradient of the step."""
    del options
    require(grads is not None, "grads", grads, "the gradients of the step (SNIP scores |g * w|)")
    return snip_scores(grads, params)


for _spec in (
    ScoreSpec("magnitude", magnitude_tree, needs=("params",)),
    ScoreSpec("random", random_tree, needs=("params", "key")),
    ScoreSpec("snip", snip_tree, needs=("params", "grads")),
):
    register(_spec)
