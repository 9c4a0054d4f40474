"""The Pruner (how masks are computed) and `prune_optax`, which keeps the masks in the optimizer
state and enforces them on every update.

Composition follows jaxpruner's `wrap_optax`: any optax transformation runs on masked
gradients, and the wrapper rewrites the final update of each pruned weight to `-param`, so that
`optax.apply_updates` leaves it at exactly zero whatever the inner optimizer did (momentum,
weight decay). Masks change only at the schedule's update steps.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from moejax.pruning import patterns, scores
from moejax.pruning.masks import ParamFilter, apply_masks, ones_masks, path_name, prunable_tree
from moejax.pruning.schedules import NoUpdates, Schedule

PATTERNS = ("unstructured", "nm", "block", "neuron", "expert", "layer")
SCORES = ("magnitude", "random", "snip")
SCOPES = ("layer", "global")
DENSITIES = ("uniform", "erk")


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed values: {allowed}.")


@dataclasses.dataclass(frozen=True)
class Pruner:
    """How masks are computed: which params (`param_filter`), ranked by which `score`, cut by
    which `pattern`, when (`schedule`), and whether a pruned weight may come back.

    pattern: "unstructured" | "nm" (n of every m along `axis`) | "block" (`block_shape` tiles of
    the last two dims) | "neuron" (whole slices along `slice_axis`) | "expert" (whole experts:
    axis 0 of the sibling leaves under one parent, pruned together) | "layer" (whole tensors).
    score: "magnitude" | "random" | "snip" (|grad * param| with the gradient of the step).
    scope: unstructured only; "layer" gives each tensor the sparsity (uniform or ERK `density`),
    "global" ranks all prunable entries together.
    rewind_step: if set, the params before update number `rewind_step` (0: the initial params)
    are stored in the state for lottery-ticket rewinding.
    """

    schedule: Schedule = NoUpdates()
    pattern: str = "unstructured"
    score: str = "magnitude"
    scope: str = "layer"
    density: str = "uniform"
    n: int = 2
    m: int = 4
    axis: int = 0
    block_shape: tuple[int, int] = (4, 4)
    slice_axis: int = -1
    param_filter: Callable[[str, Any], bool] = ParamFilter()
    allow_regrowth: bool = False
    rewind_step: int | None = None
    mask_dtype: Any = jnp.bool_
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("pattern", self.pattern, PATTERNS)
        _check_choice("score", self.score, SCORES)
        _check_choice("scope", self.scope, SCOPES)
        _check_choice("density", self.density, DENSITIES)
        if self.pattern == "nm" and not 0 < self.n <= self.m:
            raise ValueError(f"n must satisfy 0 < n <= m, got n={self.n}, m={self.m}.")
        if self.rewind_step is not None and self.rewind_step < 0:
            raise ValueError(f"rewind_step must be None or >= 0, got {self.rewind_step}.")

    def prunable(self, params: Any) -> Any:
        """A tree of Python bools like params."""
        return prunable_tree(params, self.param_filter)

    def init_masks(self, params: Any) -> Any:
        return ones_masks(params, self.mask_dtype)

    def compute_masks(
        self,
        params: Any,
        masks: Any,
        sparsity: float | jax.Array,
        key: jax.Array,
        grads: Any = None,
        score_tree: Any = None,
    ) -> Any:
        """New masks (like params) at `sparsity` of the prunable entries.

        score_tree: precomputed scores like params (Wanda, routing frequency, ...); None
        computes `self.score` from params (and grads for SNIP). Without `allow_regrowth`,
        entries pruned in `masks` stay pruned.
        """
        if score_tree is None:
            score_tree = self._scores(params, key, grads)
        prunable = self.prunable(params)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(score_tree)
        old = jax.tree.leaves(masks)
        flags = jax.tree.leaves(prunable)
        chosen = [i for i, flag in enumerate(flags) if flag]
        ranked = {
            i: patterns.masked_scores(leaves[i][1], None if self.allow_regrowth else old[i])
            for i in chosen
        }
        names = {i: path_name(leaves[i][0]) for i in chosen}
        new = self._pattern_masks(ranked, names, sparsity)
        out = []
        for i, mask in enumerate(old):
            if i in new:
                keep = new[i] if self.allow_regrowth else new[i] & mask.astype(bool)
                out.append(keep.astype(self.mask_dtype))
            else:
                out.append(mask)
        return jax.tree.unflatten(treedef, out)

    def _scores(self, params: Any, key: jax.Array, grads: Any) -> Any:
        if self.score == "magnitude":
            return jax.tree.map(scores.magnitude_scores, params)
        if self.score == "snip":
            if grads is None:
                raise ValueError("score='snip' needs grads; pass grads= or use another score.")
            return scores.snip_scores(grads, params)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(
            treedef,
            [scores.random_scores(k, jnp.shape(p)) for k, p in zip(keys, leaves, strict=True)],
        )

    def _pattern_masks(self, ranked: dict, names: dict, sparsity) -> dict[int, jax.Array]:
        if not ranked:
            return {}
        ids = list(ranked)
        if self.pattern == "unstructured" and self.scope == "global":
            kept = patterns.global_unstructured_masks([ranked[i] for i in ids], sparsity)
            return dict(zip(ids, kept, strict=True))
        if self.pattern == "layer":
            kept = patterns.layer_masks([ranked[i] for i in ids], sparsity)
            return dict(zip(ids, kept, strict=True))
        if self.pattern == "expert":
            return self._expert_masks(ranked, names, sparsity)
        layer_sparsity = {i: sparsity for i in ids}
        if self.pattern == "unstructured" and self.density == "erk":
            densities = scores.erk_densities([ranked[i].shape for i in ids], 1.0 - sparsity)
            layer_sparsity = {i: 1.0 - densities[j] for j, i in enumerate(ids)}
        out = {}
        for i in ids:
            if self.pattern == "unstructured":
                out[i] = patterns.unstructured_mask(ranked[i], layer_sparsity[i])
            elif self.pattern == "nm":
                out[i] = patterns.nm_mask(ranked[i], self.n, self.m, self.axis)
            elif self.pattern == "block":
                out[i] = patterns.block_mask(ranked[i], layer_sparsity[i], self.block_shape)
            else:
                out[i] = patterns.slice_mask(ranked[i], layer_sparsity[i], self.slice_axis)
        return out

    def _expert_masks(self, ranked: dict, names: dict, sparsity) -> dict[int, jax.Array]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, name in names.items():
            groups[name.rpartition("/")[0]].append(i)
        out = {}
        for members in groups.values():
            # One score per expert, summed over the experts' weights in every sibling leaf.
            expert_scores = sum(
                ranked[i].reshape(ranked[i].shape[0], -1).sum(axis=1) for i in members
            )
            kept = patterns.expert_masks(
                {str(i): ranked[i] for i in members}, sparsity, expert_scores
            )
            out.update({i: kept[str(i)] for i in members})
        return out


class PruneState(NamedTuple):
    """The optimizer state of `prune_optax`: update `count`, `masks` (like params), the inner
    optimizer's state and, if the pruner rewinds, `rewind_params` (like params, else None)."""

    count: jax.Array
    masks: Any
    inner_state: Any
    rewind_params: Any


def prune_optax(
    inner: optax.GradientTransformation, pruner: Pruner
) -> optax.GradientTransformation:
    """Wraps `inner` so that pruned weights stay at zero and masks follow `pruner.schedule`.

    On each update: gradients are masked (the inner moments of pruned weights see zeros), the
    inner optimizer runs, new masks are computed at schedule steps from the would-be params,
    and each pruned weight's update becomes `-param`. Needs `params` in `update`.
    """

    def init(params: Any) -> PruneState:
        rewind = None
        if pruner.rewind_step is not None:
            rewind = jax.tree.map(jnp.asarray, params)
        return PruneState(
            count=jnp.zeros((), jnp.int32),
            masks=pruner.init_masks(params),
            inner_state=inner.init(params),
            rewind_params=rewind,
        )

    def update(updates: Any, state: PruneState, params: Any = None, **extra_args: Any):
        if params is None:
            raise ValueError("params: prune_optax needs the params in update(), got None.")
        grads = updates
        masked_grads = apply_masks(grads, state.masks)
        inner_updates, inner_state = inner.update(
            masked_grads, state.inner_state, params, **extra_args
        )
        candidate = optax.apply_updates(params, inner_updates)
        key = jax.random.fold_in(jax.random.key(pruner.seed), state.count)
        sparsity = pruner.schedule.sparsity(state.count)
        masks = jax.lax.cond(
            pruner.schedule.is_update_step(state.count),
            lambda: pruner.compute_masks(candidate, state.masks, sparsity, key, grads),
            lambda: state.masks,
        )
        new_updates = jax.tree.map(
            lambda u, p, m: jnp.where(m.astype(bool), u, -p).astype(u.dtype),
            inner_updates,
            params,
            masks,
        )
        rewind = state.rewind_params
        if rewind is not None:
            take = state.count == pruner.rewind_step
            rewind = jax.tree.map(lambda p, r: jnp.where(take, p, r), params, rewind)
        return new_updates, PruneState(state.count + 1, masks, inner_state, rewind)

    return optax.GradientTransformationExtraArgs(init, update)


def find_prune_state(opt_state: Any) -> PruneState:
    """The PruneState inside an optimizer state (nested tuples of an optax chain)."""
    if isinstance(opt_state, PruneState):
        return opt_state
    if isinstance(opt_state, tuple | list):
        for child in opt_state:
            try:
                return find_prune_state(child)
            except ValueError:
                continue
    raise ValueError(f"opt_state: no PruneState inside a {type(opt_state).__name__}.")


def replace_prune_state(opt_state: Any, new: PruneState) -> Any:
    """`opt_state` with its PruneState replaced by `new` (e.g. masks set from outside)."""
    if isinstance(opt_state, PruneState):
        return new
    if isinstance(opt_state, tuple | list):
        children = [replace_prune_state(c, new) for c in opt_state]
        if hasattr(opt_state, "_fields"):
            return type(opt_state)(*children)
        return type(opt_state)(children)
    return opt_state


def get_masks(opt_state: Any) -> Any:
    """The masks (like params) held in an optimizer state built by `prune_optax`."""
    return find_prune_state(opt_state).masks


def rewound_params(opt_state: Any) -> Any:
    """The stored rewind point with the current masks applied (lottery-ticket rewinding)."""
    state = find_prune_state(opt_state)
    if state.rewind_params is None:
        raise ValueError("opt_state: the pruner has rewind_step=None, so nothing was stored.")
    return apply_masks(state.rewind_params, state.masks)
