"""The method "maskllm": learnable N:M masks with frozen weights.

*MaskLLM: Learnable Semi-Structured Sparsity for Large Language Models.* Every group of M
consecutive weights (along `axis`) gets logits over the C(M, N) candidate masks that keep N of
them. A differentiable mask is sampled with Gumbel-softmax: probabilities
softmax((κ · logits + gumbel) / τ) weight the candidates, so the soft mask is their convex
combination. The logits are trained end to end on the task loss while the weights stay frozen;
τ anneals towards 0 (samples become one-hot) and κ grows (the distribution sharpens). The final
mask is each group's argmax candidate. Logits may start from a prior mask (magnitude here).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from moejax.errors import require
from moejax.pruning.base import MethodSpec, PruningOptions, register
from moejax.pruning.masks import path_name
from moejax.pruning.patterns import nm_mask


def candidate_masks(n: int, m: int) -> jax.Array:
    """All C(m, n) masks of m entries with exactly n kept, in lexicographic order: bool [C, m]."""
    require(0 < n <= m, "n", n, f"0 < n <= m={m}")
    rows = [[j in kept for j in range(m)] for kept in itertools.combinations(range(m), n)]
    return jnp.asarray(np.array(rows, dtype=bool))


def _groups(w: jax.Array, m: int, axis: int) -> jax.Array:
    """w: [..., d, ...] -> [groups, m], groups of m consecutive entries along `axis`."""
    require(w.shape[axis] % m == 0, f"axis {axis} size", w.shape[axis], f"a multiple of m={m}")
    return jnp.moveaxis(w, axis, -1).reshape(-1, m)


def _ungroup(groups: jax.Array, shape: tuple[int, ...], axis: int) -> jax.Array:
    """Inverse of `_groups`: [groups, m] -> `shape`."""
    moved = list(shape)
    moved.append(moved.pop(axis % len(shape)))
    return jnp.moveaxis(groups.reshape(moved), -1, axis)


def init_logits(
    w: jax.Array, n: int, m: int, axis: int = 0, prior_strength: float = 0.0
) -> jax.Array:
    """Logits [groups, C]: `prior_strength` on the candidate equal to the magnitude N:M mask of
    `w`, 0 elsewhere (prior_strength 0: uniform over the candidates)."""
    candidates = candidate_masks(n, m)  # [C, m]
    prior = _groups(nm_mask(jnp.abs(w), n, m, axis), m, axis)  # [groups, m]
    matches = jnp.all(prior[:, None, :] == candidates[None], axis=-1)  # [groups, C]
    return prior_strength * matches.astype(jnp.float32)


def soft_mask(
    logits: jax.Array, key: jax.Array, candidates: jax.Array, temperature: float, scale: float
) -> jax.Array:
    """A Gumbel-softmax sample: logits [groups, C] -> soft mask [groups, m] in [0, 1]."""
    gumbel = jax.random.gumbel(key, logits.shape, jnp.float32)
    probs = jax.nn.softmax((scale * logits + gumbel) / temperature, axis=-1)  # [groups, C]
    return probs @ candidates.astype(jnp.float32)


def hard_mask(logits: jax.Array, candidates: jax.Array, shape: tuple[int, ...], axis: int):
    """The argmax candidate of every group, in the weight's shape: bool `shape`."""
    chosen = candidates[jnp.argmax(logits, axis=-1)]  # [groups, m]
    return _ungroup(chosen, shape, axis)


def masked_weight(
    w: jax.Array,
    logits: jax.Array,
    key: jax.Array,
    candidates: jax.Array,
    *,
    axis: int,
    temperature: float | jax.Array,
    scale: float | jax.Array,
) -> jax.Array:
    """w ⊙ (a sampled soft N:M mask), differentiable in `logits`. w: any shape -> same."""
    mask = soft_mask(logits, key, candidates, temperature, scale)  # [groups, m]
    return w * _ungroup(mask, w.shape, axis).astype(w.dtype)


def anneal(step: jax.Array, total: int, start: float, end: float) -> jax.Array:
    """Linear interpolation from `start` (step 0) to `end` (step `total`)."""
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(total, 1), 0.0, 1.0)
    return start + (end - start) * progress


def learn_masks(
    loss_fn: Callable[[dict[str, jax.Array]], jax.Array],
    weights: dict[str, jax.Array],
    *,
    n: int,
    m: int,
    axis: int = 0,
    steps: int = 200,
    learning_rate: float = 0.05,
    temperature: tuple[float, float] = (4.0, 0.05),
    scale: tuple[float, float] = (1.0, 5.0),
    prior_strength: float = 0.0,
    key: jax.Array,
) -> tuple[dict[str, jax.Array], dict[str, jax.Array], jax.Array]:
    """Trains MaskLLM logits for the frozen `weights` and returns (hard masks, logits, losses).

    loss_fn: maps {name: masked weight} (same shapes as `weights`) to a scalar loss on the
    task data. The masks are bool, shaped like the weights, exactly N:M along `axis`.
    losses: [steps], the sampled-mask loss of each step.
    """
    candidates = candidate_masks(n, m)
    logits = {k: init_logits(w, n, m, axis, prior_strength) for k, w in weights.items()}
    optimizer = optax.adam(learning_rate)

    def sampled_loss(logits, key, step):
        tau = anneal(step, steps, *temperature)
        kappa = anneal(step, steps, *scale)
        keys = jax.random.split(key, len(weights))
        masked = {
            name: masked_weight(
                w, logits[name], k, candidates, axis=axis, temperature=tau, scale=kappa
            )
            for k, (name, w) in zip(keys, weights.items(), strict=True)
        }
        return loss_fn(masked)

    def body(carry, step):
        logits, opt_state = carry
        loss, grads = jax.value_and_grad(sampled_loss)(logits, jax.random.fold_in(key, step), step)
        updates, opt_state = optimizer.update(grads, opt_state, logits)
        return (optax.apply_updates(logits, updates), opt_state), loss

    (logits, _), losses = jax.lax.scan(body, (logits, optimizer.init(logits)), jnp.arange(steps))
    masks = {k: hard_mask(logits[k], candidates, w.shape, axis) for k, w in weights.items()}
    return masks, logits, losses


# --- the registered method ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MaskLLMOptions(PruningOptions):
    """Options of "maskllm": n:m groups of `m` along `axis`, `steps` Adam steps at
    `learning_rate`, τ annealed from `temperature_start` to `temperature_end`, κ from
    `scale_start` to `scale_end`, logits starting at `prior_strength` on the magnitude mask."""

    n: int = 2
    m: int = 4
    axis: int = 0
    steps: int = 200
    learning_rate: float = 0.05
    temperature_start: float = 4.0
    temperature_end: float = 0.05
    scale_start: float = 1.0
    scale_end: float = 5.0
    prior_strength: float = 0.0

    def __post_init__(self) -> None:
        require(0 < self.n <= self.m, "n", self.n, f"0 < n <= m={self.m}")
        require(self.steps >= 1, "steps", self.steps, ">= 1")
        require(self.learning_rate > 0, "learning_rate", self.learning_rate, "> 0")


def maskllm_refine(
    params: Any,
    masks: Any,
    *,
    prunable: Any,
    options: MaskLLMOptions,
    loss_fn: Callable[[dict[str, jax.Array]], jax.Array],
    key: jax.Array,
) -> Any:
    """Learns the n:m masks of the prunable leaves with the weights frozen (`learn_masks`);
    `loss_fn` maps {path name: masked weight} to the task loss. Other leaves keep `masks`."""
    named = jax.tree_util.tree_leaves_with_path(params)
    flags = jax.tree.leaves(prunable)
    weights = {path_name(p): w for (p, w), keep in zip(named, flags, strict=True) if keep}
    learned, _, _ = learn_masks(
        loss_fn,
        weights,
        n=options.n,
        m=options.m,
        axis=options.axis,
        steps=options.steps,
        learning_rate=options.learning_rate,
        temperature=(options.temperature_start, options.temperature_end),
        scale=(options.scale_start, options.scale_end),
        prior_strength=options.prior_strength,
        key=key,
    )
    return jax.tree_util.tree_map_with_path(lambda path, m: learned.get(path_name(path), m), masks)


MASKLLM = register(
    MethodSpec("maskllm", MaskLLMOptions, refine=maskllm_refine, needs=("loss_fn", "key"))
)
