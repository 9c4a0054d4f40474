"""`PruningConfig`: the flat, validated fields an experiment config sets, and `make_pruner`;
`LMPruningConfig`: the same plus how the language model's train step uses the masks, the
`pruning` group of `moejax.config.Config`.

Both live here, not in `moejax.config`, so that `pruning/` never imports the config package:
`moejax.config` gathers its groups from the packages below it (as it takes `AttentionOptions`
from `moejax.sparse_attention.options`), one direction only.

Flat scalar fields (no Optional, no tuples) so the LM config's `--config.group.field=value`
overrides can parse every one of them.
"""

from __future__ import annotations

import dataclasses
import re

import optax

from moejax.errors import ConfigError, message, require_config, require_one_of
from moejax.pruning.masks import ParamFilter
from moejax.pruning.optax_wrapper import DENSITIES, PATTERNS, SCOPES, Pruner, prune_optax
from moejax.pruning.schedules import Iterative, NoUpdates, OneShot, Polynomial, Schedule

METHODS = ("none", "magnitude", "random", "snip")
SCHEDULES = ("one_shot", "iterative", "polynomial", "none")
PRUNING_MODES = ("masked", "srste")


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
        require_one_of("pruning.method", self.method, METHODS)
        require_one_of("pruning.pattern", self.pattern, PATTERNS)
        require_one_of("pruning.scope", self.scope, SCOPES)
        require_one_of("pruning.density", self.density, DENSITIES)
        require_one_of("pruning.schedule", self.schedule, SCHEDULES)
        require_config(
            0.0 <= self.target_sparsity < 1.0,
            "pruning.target_sparsity",
            self.target_sparsity,
            "in [0, 1)",
        )
        require_config(
            0.0 <= self.initial_sparsity <= self.target_sparsity,
            "pruning.initial_sparsity",
            self.initial_sparsity,
            f"in [0, pruning.target_sparsity={self.target_sparsity}]",
        )
        minimums = {"begin_step": 0, "seed": 0, "min_ndim": 0, "rewind_step": -1}
        minimums |= dict.fromkeys(("frequency", "rounds", "n", "block_rows", "block_cols"), 1)
        for name, minimum in minimums.items():
            value = getattr(self, name)
            require_config(value >= minimum, f"pruning.{name}", value, f">= {minimum}")
        require_config(
            self.schedule != "polynomial" or self.end_step > self.begin_step,
            "pruning.end_step",
            self.end_step,
            f"> pruning.begin_step={self.begin_step} for the polynomial schedule",
        )
        require_config(self.m >= self.n, "pruning.m", self.m, f">= pruning.n={self.n}")
        try:
            re.compile(self.param_regex)
        except re.error as error:
            raise ConfigError(
                message("pruning.param_regex", self.param_regex, f"a valid regex ({error})")
            ) from None

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


@dataclasses.dataclass(frozen=True)
class LMPruningConfig(PruningConfig):
    """`PruningConfig` (which weights, which pattern, when) plus how the LM's train step uses
    the masks. method="none" (the default) leaves training and checkpoints as without pruning.

    mode: "masked": the forward pass and every update use the masks of the optimizer state, so
    pruned weights are exactly zero. "srste": *Learning N:M Fine-grained Structured Sparse
    Neural Networks From Scratch*: the dense weights train, the forward pass uses their n:m
    mask recomputed from |W| every step, the gradient goes straight through plus
    srste_decay * (1 - M) * W; the optimizer state holds the current n:m masks. It needs
    method="magnitude", pattern="nm" and schedule="none".
    flow_begin, flow_end, flow_intervals: *Progressive Gradient Flow for Robust N:M Sparsity
    Training in Transformers*: in "srste" mode the gradient share reaching pruned weights
    decays from 1 to 0 in `flow_intervals` stairs between these steps; flow_end <= flow_begin
    (the default) keeps it at 1.
    """

    mode: str = "masked"
    srste_decay: float = 2e-4
    flow_begin: int = 0
    flow_end: int = 0
    flow_intervals: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        require_one_of("pruning.mode", self.mode, PRUNING_MODES)
        require_config(self.srste_decay >= 0, "pruning.srste_decay", self.srste_decay, ">= 0")
        require_config(
            self.flow_intervals >= 1, "pruning.flow_intervals", self.flow_intervals, ">= 1"
        )
        if self.mode != "srste" or self.method == "none":
            return
        needed = {"method": "magnitude", "pattern": "nm", "schedule": "none"}
        for name, value in needed.items():
            require_config(
                getattr(self, name) == value,
                f"pruning.{name}",
                getattr(self, name),
                f"{value!r} with pruning.mode='srste' (SR-STE recomputes the n:m mask from |W| "
                "every step)",
            )

    @property
    def enabled(self) -> bool:
        return self.method != "none"
