"""The Pruner (how masks are computed) and `prune_optax`, which keeps the masks in the optimizer
state and enforces them on every update.

Composition follows jaxpruner's `wrap_optax`: any optax transformation runs on masked
gradients, and the wrapper rewrites the final update of each pruned weight to `-param`, so that
`optax.apply_updates` leaves it at exactly zero whatever the inner optimizer did (momentum,
weight decay). Masks change only at the schedule's update steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from moejax.errors import message, require
from moejax.pruning import patterns
from moejax.pruning.base import PruningOptions, get_pattern, get_score, options_of
from moejax.pruning.masks import ParamFilter, apply_masks, ones_masks, path_name, prunable_tree
from moejax.pruning.schedules import NoUpdates, Schedule


@dataclasses.dataclass(frozen=True)
class Pruner:
    """How masks are computed: which params (`param_filter`), ranked by which `score`, cut by
    which `pattern`, when (`schedule`), and whether a pruned weight may come back.

    pattern: a name of the pattern registry (`moejax.pruning.base.PATTERNS`: "unstructured",
    "nm", "block", "neuron", "expert", "layer", ...) with `pattern_options` its options (None:
    its defaults, e.g. `NMOptions(n=2, m=4, axis=0)`). score: a name of the score registry
    ("magnitude", "random", "snip", ...) with `score_options`. rewind_step: if set, the params
    before update number `rewind_step` (0: the initial params) are stored in the state for
    lottery-ticket rewinding.
    """

    schedule: Schedule = NoUpdates()
    pattern: str = "unstructured"
    pattern_options: PruningOptions | None = None
    score: str = "magnitude"
    score_options: PruningOptions | None = None
    param_filter: Callable[[str, Any], bool] = ParamFilter()
    allow_regrowth: bool = False
    rewind_step: int | None = None
    mask_dtype: Any = jnp.bool_
    seed: int = 0

    def __post_init__(self) -> None:
        pattern_options = options_of(get_pattern(self.pattern), self.pattern_options)
        score_options = options_of(get_score(self.score), self.score_options)
        object.__setattr__(self, "pattern_options", pattern_options)
        object.__setattr__(self, "score_options", score_options)
        require(
            self.rewind_step is None or self.rewind_step >= 0,
            "rewind_step",
            self.rewind_step,
            "None or an int >= 0",
        )

    def prunable(self, params: Any) -> Any:
        """A tree of Python bools like params."""
        return prunable_tree(params, self.param_filter)

    def init_masks(self, params: Any) -> Any:
        return ones_masks(params, self.mask_dtype)

    def scores(self, params: Any, key: jax.Array, grads: Any = None) -> Any:
        """The score tree (like params) of `self.score`, given what its spec needs."""
        spec = get_score(self.score)
        available = {"params": params, "grads": grads, "key": key}
        return spec.score(**{n: available[n] for n in spec.needs}, options=self.score_options)

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
            score_tree = self.scores(params, key, grads)
        prunable = self.prunable(params)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(score_tree)
        old = jax.tree.leaves(masks)
        flags = jax.tree.leaves(prunable)
        chosen = [i for i, flag in enumerate(flags) if flag]
        new = {}
        if chosen:
            ranked = [
                patterns.masked_scores(leaves[i][1], None if self.allow_regrowth else old[i])
                for i in chosen
            ]
            names = [path_name(leaves[i][0]) for i in chosen]
            kept = get_pattern(self.pattern).masks(
                scores=ranked, names=names, sparsity=sparsity, options=self.pattern_options
            )
            new = dict(zip(chosen, kept, strict=True))
        out = []
        for i, mask in enumerate(old):
            if i in new:
                keep = new[i] if self.allow_regrowth else new[i] & mask.astype(bool)
                out.append(keep.astype(self.mask_dtype))
            else:
                out.append(mask)
        return jax.tree.unflatten(treedef, out)


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
        require(params is not None, "params", params, "the params, passed to update()")
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
    raise ValueError(
        message("opt_state", type(opt_state).__name__, "an optimizer state built by prune_optax")
    )


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
    require(
        state.rewind_params is not None,
        "rewind_step",
        None,
        "an int >= 0 in the Pruner (rewind_step=None stores no rewind point)",
    )
    return apply_masks(state.rewind_params, state.masks)
