"""Sparsity schedules: the target sparsity at a step and the steps at which masks change.

Both methods take a (possibly traced) int step and return jnp scalars, so the optimizer wrapper
can evaluate them inside `jit`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax.errors import require
from moejax.pruning.base import PruningOptions, ScheduleSpec, register


def _check_fraction(name: str, value: float) -> None:
    require(0.0 <= value < 1.0, name, value, "in [0, 1)")


def _check_step(name: str, value: int, minimum: int = 0) -> None:
    require(value >= minimum, name, value, f"an int >= {minimum}")


@dataclasses.dataclass(frozen=True)
class OneShot:
    """All of `target` at once, at `step`."""

    target: float
    step: int = 0

    def __post_init__(self) -> None:
        _check_fraction("target", self.target)
        _check_step("step", self.step)

    def sparsity(self, step: jax.Array | int) -> jax.Array:
        return jnp.where(jnp.asarray(step) >= self.step, self.target, 0.0).astype(jnp.float32)

    def is_update_step(self, step: jax.Array | int) -> jax.Array:
        return jnp.asarray(step) == self.step


@dataclasses.dataclass(frozen=True)
class Iterative:
    """`rounds` prunings `round_steps` apart from `begin`, each removing the same fraction of the
    remaining weights, so after the last one the sparsity is `target`: after round r (1-based)
    it is `1 - (1 - target) ** (r / rounds)`."""

    target: float
    rounds: int
    round_steps: int
    begin: int = 0

    def __post_init__(self) -> None:
        _check_fraction("target", self.target)
        _check_step("rounds", self.rounds, 1)
        _check_step("round_steps", self.round_steps, 1)
        _check_step("begin", self.begin)

    def _rounds_done(self, step: jax.Array | int) -> jax.Array:
        done = (jnp.asarray(step) - self.begin) // self.round_steps + 1
        return jnp.clip(done, 0, self.rounds)

    def sparsity(self, step: jax.Array | int) -> jax.Array:
        fraction = self._rounds_done(step).astype(jnp.float32) / self.rounds
        return 1.0 - (1.0 - self.target) ** fraction

    def is_update_step(self, step: jax.Array | int) -> jax.Array:
        offset = jnp.asarray(step) - self.begin
        return (
            (offset >= 0)
            & (offset % self.round_steps == 0)
            & (offset < self.rounds * self.round_steps)
        )


@dataclasses.dataclass(frozen=True)
class Polynomial:
    """Gradual pruning from `initial` to `target` over [begin, end], masks updated every
    `frequency` steps: s_t = s_f + (s_i - s_f) * (1 - (t - begin) / (end - begin)) ** power.

    *To prune, or not to prune: exploring the efficacy of pruning for model compression*
    (Zhu & Gupta, power 3). Between updates the sparsity stays at the last update's value.
    """

    target: float
    begin: int
    end: int
    frequency: int = 1
    initial: float = 0.0
    power: float = 3.0

    def __post_init__(self) -> None:
        _check_fraction("target", self.target)
        _check_fraction("initial", self.initial)
        _check_step("begin", self.begin)
        require(self.end > self.begin, "end", self.end, f"> begin={self.begin}")
        _check_step("frequency", self.frequency, 1)
        require(self.power > 0, "power", self.power, "> 0")

    def sparsity(self, step: jax.Array | int) -> jax.Array:
        step = jnp.asarray(step)
        last_update = self.begin + (step - self.begin) // self.frequency * self.frequency
        # The last update lands on `end` even when `end - begin` is not a multiple of frequency.
        t = jnp.where(step >= self.end, self.end, jnp.clip(last_update, self.begin, self.end))
        progress = (t - self.begin).astype(jnp.float32) / (self.end - self.begin)
        value = self.target + (self.initial - self.target) * (1.0 - progress) ** self.power
        return jnp.where(step >= self.begin, value, 0.0).astype(jnp.float32)

    def is_update_step(self, step: jax.Array | int) -> jax.Array:
        step = jnp.asarray(step)
        on_grid = (step - self.begin) % self.frequency == 0
        return (step >= self.begin) & (step <= self.end) & (on_grid | (step == self.end))


@dataclasses.dataclass(frozen=True)
class NoUpdates:
    """Masks are never recomputed by the optimizer: they are set from outside (lottery tickets,
    one-shot post-training methods) and only enforced."""

    def sparsity(self, step: jax.Array | int) -> jax.Array:
        del step
        return jnp.float32(0.0)

    def is_update_step(self, step: jax.Array | int) -> jax.Array:
        return jnp.zeros(jnp.shape(step), bool)


Schedule = OneShot | Iterative | Polynomial | NoUpdates


# --- the registered schedules ------------------------------------------------------------


def _check_steps(options: PruningOptions, names: tuple[str, ...], minimum: int) -> None:
    for name in names:
        value = getattr(options, name)
        require(isinstance(value, int) and value >= minimum, name, value, f"an int >= {minimum}")


@dataclasses.dataclass(frozen=True)
class OneShotOptions(PruningOptions):
    """Options of "one_shot": all of the target sparsity at `begin_step`."""

    begin_step: int = 0

    def __post_init__(self) -> None:
        _check_steps(self, ("begin_step",), 0)


@dataclasses.dataclass(frozen=True)
class IterativeOptions(PruningOptions):
    """Options of "iterative": `rounds` prunings every `frequency` steps from `begin_step`."""

    begin_step: int = 0
    frequency: int = 100
    rounds: int = 1

    def __post_init__(self) -> None:
        _check_steps(self, ("begin_step",), 0)
        _check_steps(self, ("frequency", "rounds"), 1)


@dataclasses.dataclass(frozen=True)
class PolynomialOptions(PruningOptions):
    """Options of "polynomial" (Zhu & Gupta): from `initial_sparsity` at `begin_step` to the
    target at `end_step`, masks updated every `frequency` steps, exponent `power`."""

    begin_step: int = 0
    end_step: int = 1000
    frequency: int = 100
    initial_sparsity: float = 0.0
    power: float = 3.0

    def __post_init__(self) -> None:
        _check_steps(self, ("begin_step",), 0)
        _check_steps(self, ("frequency",), 1)
        require(
            self.end_step > self.begin_step,
            "end_step",
            self.end_step,
            f"> begin_step={self.begin_step}",
        )
        require(
            0.0 <= self.initial_sparsity < 1.0,
            "initial_sparsity",
            self.initial_sparsity,
            "in [0, 1)",
        )
        require(self.power > 0, "power", self.power, "> 0")


def _polynomial(target: float, options: PolynomialOptions) -> Polynomial:
    require(
        options.initial_sparsity <= target,
        "initial_sparsity",
        options.initial_sparsity,
        f"<= the target sparsity {target}",
    )
    return Polynomial(
        target,
        options.begin_step,
        options.end_step,
        options.frequency,
        options.initial_sparsity,
        options.power,
    )


for _spec in (
    ScheduleSpec(
        "one_shot",
        lambda target, o: OneShot(target, o.begin_step),
        OneShotOptions,
        first_step=lambda o: o.begin_step,
    ),
    ScheduleSpec(
        "iterative",
        lambda target, o: Iterative(target, o.rounds, o.frequency, o.begin_step),
        IterativeOptions,
        first_step=lambda o: o.begin_step,
    ),
    ScheduleSpec("polynomial", _polynomial, PolynomialOptions, first_step=lambda o: o.begin_step),
    ScheduleSpec("none", lambda target, o: NoUpdates()),
):
    register(_spec)
