"""`PruningConfig`: what to prune, chosen by name from the four registries with each choice's
typed options nested under it, and `make_pruner`; `LMPruningConfig`: the `pruning` group of
`moejax.config.Config`.

    --config.pruning.method.name=masked --config.pruning.score.name=magnitude
    --config.pruning.pattern.name=nm --config.pruning.pattern.options.n=2
    --config.pruning.schedule.name=polynomial --config.pruning.schedule.options.end_step=500

Setting a choice's `name` starts its `options` from the new entry's defaults (`resets`, as for
`model.router`). Both classes live here, not in `moejax.config`, so that `pruning/` never
imports the config package: `moejax.config` gathers its groups from the packages below it, one
direction only.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

import optax

from moejax.errors import ConfigError, message, require_config, require_one_of
from moejax.pruning import base
from moejax.pruning.base import (
    MethodSpec,
    PatternSpec,
    PruningOptions,
    ScheduleSpec,
    ScoreSpec,
)
from moejax.pruning.masks import ParamFilter
from moejax.pruning.optax_wrapper import Pruner, prune_optax
from moejax.pruning.schedules import Schedule


@dataclasses.dataclass(frozen=True)
class _Choice:
    """One entry of a registry and its typed options (None: the entry's defaults)."""

    name: str
    options: PruningOptions | None = None

    # Setting `name` from the command line starts `options` from the new entry's defaults.
    resets: ClassVar[dict[str, str]] = {"name": "options"}
    kind: ClassVar[str]
    table: ClassVar[dict[str, Any]]

    def __post_init__(self) -> None:
        require_one_of(f"pruning.{self.kind}.name", self.name, list(self.table))
        options_class = self.spec.options
        if self.options is None:
            object.__setattr__(self, "options", options_class())
        require_config(
            type(self.options) is options_class,
            f"pruning.{self.kind}.options",
            self.options,
            f"a {options_class.__name__} (the options of {self.kind} {self.name!r})",
        )

    @property
    def spec(self) -> Any:
        return self.table[self.name]

    @classmethod
    def of(cls, name: str, **options: Any) -> Any:
        """`cls(name, options=<name's options>(**options))`, e.g.
        `PatternConfig.of("nm", n=2, m=4)`."""
        require_one_of(f"pruning.{cls.kind}.name", name, list(cls.table))
        return cls(name=name, options=cls.table[name].options(**options))


@dataclasses.dataclass(frozen=True)
class MethodConfig(_Choice):
    """How training uses the masks: a name from `moejax.pruning.base.METHODS` ("none" turns
    pruning off; "masked", "srste", "lottery", "maskllm", "dsnot", ...) and its options."""

    # The method, a name from moejax.pruning.base.METHODS ("none": no pruning).
    name: str = "none"
    # The method's own options (pruning.method.options.*); None: its defaults.
    options: PruningOptions | None = None

    kind: ClassVar[str] = "method"
    table: ClassVar[dict[str, MethodSpec]] = base.METHODS


@dataclasses.dataclass(frozen=True)
class ScoreConfig(_Choice):
    """Which entries matter most: a name from `moejax.pruning.base.SCORES` and its options."""

    # The score, a name from moejax.pruning.base.SCORES.
    name: str = "magnitude"
    # The score's own options (pruning.score.options.*); None: its defaults.
    options: PruningOptions | None = None

    kind: ClassVar[str] = "score"
    table: ClassVar[dict[str, ScoreSpec]] = base.SCORES


@dataclasses.dataclass(frozen=True)
class PatternConfig(_Choice):
    """Which shapes are pruned together: a name from `moejax.pruning.base.PATTERNS` and its
    options (`n`, `m`, `axis` of "nm"; `scope`, `density` of "unstructured"; ...)."""

    # The pattern, a name from moejax.pruning.base.PATTERNS.
    name: str = "unstructured"
    # The pattern's own options (pruning.pattern.options.*); None: its defaults.
    options: PruningOptions | None = None

    kind: ClassVar[str] = "pattern"
    table: ClassVar[dict[str, PatternSpec]] = base.PATTERNS


@dataclasses.dataclass(frozen=True)
class ScheduleConfig(_Choice):
    """When masks change: a name from `moejax.pruning.base.SCHEDULES` ("none": masks set from
    outside) and its options (`begin_step`, `frequency`, ...)."""

    # The schedule, a name from moejax.pruning.base.SCHEDULES.
    name: str = "one_shot"
    # The schedule's own options (pruning.schedule.options.*); None: its defaults.
    options: PruningOptions | None = None

    kind: ClassVar[str] = "schedule"
    table: ClassVar[dict[str, ScheduleSpec]] = base.SCHEDULES


@dataclasses.dataclass(frozen=True)
class PruningConfig:
    """How to prune during training.

    method: how training uses the masks ("none" disables pruning). score, pattern, schedule:
    how masks are computed and when. target_sparsity: the final fraction of pruned prunable
    weights (a pattern that fixes its own, n:m, ignores it). param_regex / min_ndim: which
    params are prunable, e.g. r"(w_gate|w_up|w_down)$" for the expert weights of the MoE
    layers. rewind_step: -1 stores no rewind point.
    """

    method: MethodConfig = dataclasses.field(default_factory=MethodConfig)
    score: ScoreConfig = dataclasses.field(default_factory=ScoreConfig)
    pattern: PatternConfig = dataclasses.field(default_factory=PatternConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    target_sparsity: float = 0.5
    param_regex: str = ".*"
    min_ndim: int = 2
    allow_regrowth: bool = False
    rewind_step: int = -1
    seed: int = 0

    def __post_init__(self) -> None:
        require_config(
            0.0 <= self.target_sparsity < 1.0,
            "pruning.target_sparsity",
            self.target_sparsity,
            "in [0, 1)",
        )
        minimums = {"seed": 0, "min_ndim": 0, "rewind_step": -1}
        for name, minimum in minimums.items():
            value = getattr(self, name)
            require_config(value >= minimum, f"pruning.{name}", value, f">= {minimum}")
        try:
            re.compile(self.param_regex)
        except re.error as error:
            raise ConfigError(
                message("pruning.param_regex", self.param_regex, f"a valid regex ({error})")
            ) from None
        for kind, needed in self.method.spec.requires.items():
            chosen = getattr(self, kind).name
            require_config(
                chosen == needed,
                f"pruning.{kind}.name",
                chosen,
                f"{needed!r} with pruning.method.name={self.method.name!r}",
            )
        try:
            self.make_schedule()
        except ValueError as error:
            raise ConfigError(f"pruning.schedule.options.{error}") from None

    @property
    def enabled(self) -> bool:
        """False for the method that turns pruning off."""
        return self.method.spec.prunes

    def make_schedule(self) -> Schedule:
        return self.schedule.spec.make(self.target_sparsity, self.schedule.options)

    def first_prune_step(self) -> int | None:
        """The first step at which the schedule changes masks; None when pruning is off or
        the masks are set from outside."""
        first_step = self.schedule.spec.first_step
        if not self.enabled or first_step is None:
            return None
        return first_step(self.schedule.options)


def make_pruner(config: PruningConfig) -> Pruner | None:
    """The Pruner a config describes; None when pruning is off."""
    if not config.enabled:
        return None
    return Pruner(
        schedule=config.make_schedule(),
        pattern=config.pattern.name,
        pattern_options=config.pattern.options,
        score=config.score.name,
        score_options=config.score.options,
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


@dataclasses.dataclass(frozen=True)
class LMPruningConfig(PruningConfig):
    """The `pruning` group of the language model's config: a `PruningConfig` whose method's
    hooks the train step calls (`moejax.training.pruning.LMPruning`). method "none" (the
    default) leaves training and checkpoints as without pruning; "masked": the forward pass
    and every update use the optimizer-state masks, so pruned weights are exactly zero;
    "srste": the dense weights train, the forward pass uses their n:m mask recomputed from
    |W| every step (`pruning.method.options.decay`, `flow_*`)."""
