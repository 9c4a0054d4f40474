"""The pruning contract: spec types and registries of patterns, scores, schedules and methods.

jaxpruner keys its algorithms by name in one table; moejax keeps four, one per kind of choice,
each shaped like the router registry (`moejax.routers.base`): a frozen spec per entry, a typed
options dataclass per entry (the `options` of the config group that chose it, e.g.
`pruning.pattern.options.n`), `register` checking the spec and refusing a taken name, and `get`
listing the registered names for an unknown one. `moejax.pruning` fills the tables by importing
the files that register (`patterns.py`, `scores.py`, `schedules.py` and one file per method);
adding an entry is one `register` call, from any module.

- A **pattern** turns the scores of all prunable leaves into keep-masks at a sparsity.
- A **score** ranks the entries of every leaf (higher = more important).
- A **schedule** says the sparsity at a step and the steps at which masks change.
- A **method** says how training uses the masks: what the forward pass sees, which masks the
  optimizer wrapper enforces, what the optimizer state records after an update, and (for
  methods that change masks outside the optimizer: lottery rounds, MaskLLM, DSnoT) `refine`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from moejax.errors import require


@dataclasses.dataclass(frozen=True)
class PruningOptions:
    """An entry's own settings: a frozen dataclass of defaults per pattern, score, schedule or
    method, checked when built (`__post_init__`, `moejax.errors.require`)."""


def _check_options(kind: str, name: str, options: type) -> None:
    require(
        isinstance(options, type) and issubclass(options, PruningOptions),
        f"{kind}({name!r}).options",
        options,
        "a PruningOptions subclass",
    )


def _check_keywords(kind: str, name: str, fn: Callable, keywords: tuple[str, ...]) -> None:
    """`fn` must take every name of `keywords` (or **kwargs)."""
    parameters = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    missing = [k for k in keywords if k not in parameters]
    require(not missing, f"{kind}({name!r}) function {fn.__name__}", missing, "its keywords")


# ------------------------------------------------------------------------------ patterns


@dataclasses.dataclass(frozen=True)
class PatternSpec:
    """A sparsity pattern.

    Attributes:
      name: the value of `pruning.pattern.name` that selects it.
      masks: `masks(scores, names, sparsity, options) -> list[bool array]`: `scores` the ranked
        scores of every prunable leaf (already-pruned entries at -inf), `names` their '/'-joined
        paths, `sparsity` a (possibly traced) fraction; one mask per score, same shapes.
      options: its `PruningOptions` class.
    """

    name: str
    masks: Callable[..., list[jax.Array]]
    options: type[PruningOptions] = PruningOptions

    def __post_init__(self) -> None:
        _check_options("PatternSpec", self.name, self.options)
        _check_keywords("PatternSpec", self.name, self.masks, ("scores", "names", "sparsity"))


# -------------------------------------------------------------------------------- scores

# What a score function may take, by keyword.
SCORE_NEEDS: Mapping[str, str] = {
    "params": "the params tree (the would-be params after the update)",
    "grads": "the gradient tree of the step (None outside an optimizer update)",
    "key": "a PRNG key",
}


@dataclasses.dataclass(frozen=True)
class ScoreSpec:
    """A pruning score.

    Attributes:
      name: the value of `pruning.score.name` that selects it.
      score: `score(**needs, options) -> tree like params` of float32 scores.
      needs: the keywords `score` takes, each a key of `SCORE_NEEDS`; declared, never inferred.
      options: its `PruningOptions` class.
    """

    name: str
    score: Callable[..., Any]
    needs: tuple[str, ...] = ("params",)
    options: type[PruningOptions] = PruningOptions

    def __post_init__(self) -> None:
        unknown = [n for n in self.needs if n not in SCORE_NEEDS]
        require(not unknown, f"ScoreSpec({self.name!r}).needs", unknown, ", ".join(SCORE_NEEDS))
        _check_options("ScoreSpec", self.name, self.options)
        _check_keywords("ScoreSpec", self.name, self.score, (*self.needs, "options"))


# ----------------------------------------------------------------------------- schedules


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    """A sparsity schedule.

    Attributes:
      name: the value of `pruning.schedule.name` that selects it.
      make: `make(target_sparsity, options) -> Schedule`, an object with `sparsity(step)` and
        `is_update_step(step)` (traced int step -> jnp scalars).
      options: its `PruningOptions` class.
      first_step: `options -> int`, the first step at which it changes masks; None for a
        schedule that never does (masks set from outside).
    """

    name: str
    make: Callable[[float, Any], Any]
    options: type[PruningOptions] = PruningOptions
    first_step: Callable[[Any], int] | None = None

    def __post_init__(self) -> None:
        _check_options("ScheduleSpec", self.name, self.options)


# ------------------------------------------------------------------------------- methods

# What a method's `refine` may take besides params, masks, prunable and options, by keyword.
REFINE_NEEDS: Mapping[str, str] = {
    "loss_fn": "{path name: masked weight} -> scalar task loss (MaskLLM)",
    "calibration": "{path name: inputs [tokens, d_in]} of each prunable 2-D leaf (DSnoT)",
    "key": "a PRNG key",
}


def keep_masks(masks: Any, **_: Any) -> Any:
    """The default of `optimizer_masks` and `record`: the masks unchanged."""
    return masks


def masked_forward(params: Any, masks: Any, *, prunable: Any, **_: Any) -> Any:
    """The default `forward`: the prunable leaves under their masks (pruned weights exactly
    zero, zero gradient to them), the others as they are."""
    return jax.tree.map(
        lambda p, m, keep: jnp.where(m, p, jnp.zeros((), p.dtype)) if keep else p,
        params,
        masks,
        prunable,
    )


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """How training uses the masks (jaxpruner's updater hooks, as pure functions).

    Attributes:
      name: the value of `pruning.method.name` that selects it.
      options: its `PruningOptions` class.
      prunes: False only for the method that turns pruning off ("none").
      forward: `forward(params, masks, *, step, pruner, prunable, options) -> params`, what the
        forward pass uses (default: `masked_forward`).
      optimizer_masks: `(masks, *, params, options) -> masks`, the masks the optimizer wrapper
        enforces in this update (default: the masks; SR-STE: all kept, the dense weights train).
      record: `(masks, *, params, pruner, prunable, options) -> masks`, the masks the optimizer
        state holds after an update and at init (default: unchanged).
      refine: `refine(params, masks, *, prunable, options, **needs) -> masks`, a mask change
        outside the optimizer (a lottery round, MaskLLM's learnt masks, DSnoT's swaps); None if
        the method has none.
      needs: the keywords `refine` takes besides those, each a key of `REFINE_NEEDS`.
      requires: config choice -> the name this method needs there, e.g. SR-STE's
        {"pattern": "nm", "score": "magnitude", "schedule": "none"}.
    """

    name: str
    options: type[PruningOptions] = PruningOptions
    prunes: bool = True
    forward: Callable[..., Any] = masked_forward
    optimizer_masks: Callable[..., Any] = keep_masks
    record: Callable[..., Any] = keep_masks
    refine: Callable[..., Any] | None = None
    needs: tuple[str, ...] = ()
    requires: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_options("MethodSpec", self.name, self.options)
        unknown = [n for n in self.needs if n not in REFINE_NEEDS]
        require(not unknown, f"MethodSpec({self.name!r}).needs", unknown, ", ".join(REFINE_NEEDS))
        require(
            not self.needs or self.refine is not None,
            f"MethodSpec({self.name!r}).refine",
            self.refine,
            "a function when the method declares needs",
        )
        if self.refine is not None:
            keywords = ("prunable", "options", *self.needs)
            _check_keywords("MethodSpec", self.name, self.refine, keywords)
        bad = sorted(set(self.requires) - {"pattern", "score", "schedule"})
        require(
            not bad, f"MethodSpec({self.name!r}).requires", bad, "keys pattern, score, schedule"
        )


# ---------------------------------------------------------------------------- registries

PATTERNS: dict[str, PatternSpec] = {}
SCORES: dict[str, ScoreSpec] = {}
SCHEDULES: dict[str, ScheduleSpec] = {}
METHODS: dict[str, MethodSpec] = {}

_TABLES: dict[type, tuple[str, dict]] = {
    PatternSpec: ("pattern", PATTERNS),
    ScoreSpec: ("score", SCORES),
    ScheduleSpec: ("schedule", SCHEDULES),
    MethodSpec: ("method", METHODS),
}

Spec = PatternSpec | ScoreSpec | ScheduleSpec | MethodSpec


def register(spec: Spec) -> Spec:
    """Makes `spec.name` selectable as `pruning.<kind>.name`; returns the spec. The spec checked
    itself when built; a name already taken in its table is refused."""
    require(
        type(spec) in _TABLES,
        "register",
        type(spec).__name__,
        ", ".join(t.__name__ for t in _TABLES),
    )
    kind, table = _TABLES[type(spec)]
    require(spec.name not in table, f"pruning {kind}", spec.name, "a name not already registered")
    table[spec.name] = spec
    return spec


def _get(kind: str, table: dict, name: str):
    require(name in table, f"pruning {kind}", name, ", ".join(table))
    return table[name]


def get_pattern(name: str) -> PatternSpec:
    """The pattern registered under `name`; a ValueError listing the registered ones otherwise."""
    return _get("pattern", PATTERNS, name)


def get_score(name: str) -> ScoreSpec:
    """The score registered under `name`; a ValueError listing the registered ones otherwise."""
    return _get("score", SCORES, name)


def get_schedule(name: str) -> ScheduleSpec:
    """The schedule registered under `name`; a ValueError listing the registered ones
    otherwise."""
    return _get("schedule", SCHEDULES, name)


def get_method(name: str) -> MethodSpec:
    """The method registered under `name`; a ValueError listing the registered ones otherwise."""
    return _get("method", METHODS, name)


def options_of(spec: Spec, options: PruningOptions | None) -> PruningOptions:
    """`options`, or the spec's defaults for None; a ValueError for options of another entry."""
    if options is None:
        return spec.options()
    require(
        type(options) is spec.options,
        f"{spec.name} options",
        options,
        f"a {spec.options.__name__} (the options of {spec.name!r})",
    )
    return options
