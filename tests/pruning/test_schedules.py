"""Schedule values and update steps at chosen steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.pruning.schedules import Iterative, NoUpdates, OneShot, Polynomial


def test_one_shot_prunes_everything_at_its_step():
    schedule = OneShot(0.8, step=5)
    assert [float(schedule.sparsity(s)) for s in (0, 4, 5, 100)] == pytest.approx([0, 0, 0.8, 0.8])
    assert [bool(schedule.is_update_step(s)) for s in (4, 5, 6)] == [False, True, False]


def test_iterative_removes_the_same_fraction_of_the_remaining_weights_per_round():
    schedule = Iterative(target=1 - 0.8**3, rounds=3, round_steps=10, begin=20)
    values = [float(schedule.sparsity(s)) for s in (19, 20, 29, 30, 40, 1000)]
    assert values == pytest.approx([0, 0.2, 0.2, 0.36, 0.488, 0.488], abs=1e-6)
    updates = [s for s in range(80) if bool(schedule.is_update_step(s))]
    assert updates == [20, 30, 40]


def test_polynomial_matches_zhu_and_gupta_at_chosen_steps():
    schedule = Polynomial(target=0.9, begin=100, end=200, frequency=10, initial=0.1)

    def formula(t):
        return 0.9 + (0.1 - 0.9) * (1 - (t - 100) / 100) ** 3

    steps = jnp.array([50, 100, 105, 110, 150, 199, 200, 300])
    got = np.asarray(jax.jit(schedule.sparsity)(steps))
    want = [0.0, formula(100), formula(100), formula(110), formula(150), formula(190), 0.9, 0.9]
    assert got == pytest.approx(want, abs=1e-6)
    updates = [s for s in range(0, 400) if bool(schedule.is_update_step(s))]
    assert updates == list(range(100, 201, 10))


def test_polynomial_reaches_the_target_at_end_off_the_frequency_grid():
    schedule = Polynomial(target=0.5, begin=0, end=25, frequency=10)
    assert float(schedule.sparsity(25)) == pytest.approx(0.5)
    assert bool(schedule.is_update_step(25))


def test_no_updates_never_updates():
    assert not np.any(np.asarray(NoUpdates().is_update_step(jnp.arange(10))))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: OneShot(1.0), r"target: got 1.0; allowed: in \[0, 1\)"),
        (lambda: Iterative(0.5, rounds=0, round_steps=1), "rounds: got 0; allowed: an int >= 1"),
        (lambda: Polynomial(0.5, begin=10, end=10), "end: got 10; allowed: > begin=10"),
    ],
)
def test_schedules_reject_bad_fields_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()
