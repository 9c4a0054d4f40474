"""`PruningConfig`: the flat, validated fields an experiment config sets, and `make_pruner`.

Flat scalar fields (no Optional, no tuples) so the LM config's `--config.group.field=value`
overrides can parse every one of them.
"""

from __future__ import annotations

import dataclasses

import optax

from moejax.pruning.masks import ParamFilter
from moejax.pruning.optax_wrapper import DENSITIES, PATTERNS, SCOPES, Pruner, prune_optax
from moejax.pruning.schedules import Iterative, NoUpdates, OneShot, Polynomial, Schedule

METHODS = ("none", "magnitude", "random", "snip")
SCHEDULES = ("one_shot", "iterative", "polynomial", "none")


def _allowed(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"pruning.{name}={value!r} is not allowed; allowed values: {allowed}.")


def _at_least(name: str, value: float, minimum: float) -> None:
    if value < minimum:
        raise ValueError(f"pruning.{name}={value!r} is not allowed; it must be >= {minimum}.")


@dataclasses.dataclass(frozen=True)
class PruningConfig:
    """How to prune during training.

    method: the score ("none" disables pruning). pattern: see `Pruner`. target_sparsity: the
    final fraction of pruned prunable weights (for "nm" it is fixed at 1 - n/m and this field is
    ignored). schedule: "one_shot" at begin_step; "iterative": `rounds` prunings every
    `frequency` steps from begin_step; "polynomial": Zhu & Gupta from begin_step to end_step,
    every `frequency` steps, starting at initial_sparsity; "none": masks are set from outside.
    param_regex / min_ndim: which params are prunable, e.g. r"(w_gate|w_up|w_down)$" for the
    expert weights of the MoE layers. rewind_step: -1 stores no rewind point.
    """

    method: str = "none"
    pattern: str = "unstructured"
    scope: str = "layer"
    density: str = "uniform"
    target_sparsity: float = 0.5
    schedule: str = "one_shot"
    begin_step: int = 0
    end_step: int = 1000
    frequency: int = 100
    rounds: int = 1
    initial_sparsity: float = 0.0
    n: int = 2
    m: int = 4
    nm_axis: int = 0
    block_rows: int = 4
    block_cols: int = 4
    slice_axis: int = -1
    param_regex: str = ".*"
    min_ndim: int = 2
    allow_regrowth: bool = False
    rewind_step: int = -1
    seed: int = 0

    def __post_init__(self) -> None:
        _allowed("method", self.method, METHODS)
        _allowed("pattern", self.pattern, PATTERNS)
        _allowed("scope", self.scope, SCOPES)
        _allowed("density", self.density, DENSITIES)
        _allowed("schedule", self.schedule, SCHEDULES)
        if not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(
                f"pruning.target_sparsity={self.target_sparsity!r} is not allowed; it must lie"
                " in [0, 1)."
            )
        if not 0.0 <= self.initial_sparsity <= self.target_sparsity:
            raise ValueError(
                f"pruning.initial_sparsity={self.initial_sparsity!r} is not allowed; it must lie"
                f" in [0, target_sparsity={self.target_sparsity}]."
            )
        for name in ("begin_step", "seed", "min_ndim"):
            _at_least(name, getattr(self, name), 0)
        for name in ("frequency", "rounds", "n", "block_rows", "block_cols"):
            _at_least(name, getattr(self, name), 1)
        _at_least("rewind_step", self.rewind_step, -1)
        if self.schedule == "polynomial" and self.end_step <= self.begin_step:
            raise ValueError(
                f"pruning.end_step={self.end_step} is not allowed; it must be > begin_step="
                f"{self.begin_step} for the polynomial schedule."
            )
        if self.m < self.n:
            raise ValueError(f"pruning.m={self.m} is not allowed; it must be >= n={self.n}.")
        ParamFilter(self.param_regex, self.min_ndim)

    def make_schedule(self) -> Schedule:
        if self.schedule == "one_shot":
            return OneShot(self.target_sparsity, self.begin_step)
        if self.schedule == "iterative":
            return Iterative(self.target_sparsity, self.rounds, self.frequency, self.begin_step)
        if self.schedule == "polynomial":
            return Polynomial(
                self.target_sparsity,
                self.begin_step,
                self.end_step,
                self.frequency,
                self.initial_sparsity,
            )
        return NoUpdates()


def make_pruner(config: PruningConfig) -> Pruner | None:
    """The Pruner a config describes; None for method="none"."""
    if config.method == "none":
        return None
    return Pruner(
        schedule=config.make_schedule(),
        pattern=config.pattern,
        score=config.method,
        scope=config.scope,
        density=config.density,
        n=config.n,
        m=config.m,
        axis=config.nm_axis,
        block_shape=(config.block_rows, config.block_cols),
        slice_axis=config.slice_axis,
        param_filter=ParamFilter(config.param_regex, config.min_ndim),
        allow_regrowth=config.allow_regrowth,
        rewind_step=None if config.rewind_step < 0 else config.rewind_step,
        seed=config.seed,
    )


def wrap_optimizer(
    inner: optax.GradientTransformation, config: PruningConfig
) -> optax.GradientTransformation:
    """`prune_optax(inner, make_pruner(config))`, or `inner` itself when pruning is off."""
    pruner = make_pruner(config)
    return inner if pruner is None else prune_optax(inner, pruner)
