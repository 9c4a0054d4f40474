"""Expert capacity (`moejax.moe.capacity_factors`): GShard's slots per expert, and the schedules
of DynaMoE over depth."""

import numpy as np
import pytest

from moejax.moe import capacity_schedule, expert_capacity


@pytest.mark.parametrize("num_layers", [1, 2, 5, 8])
@pytest.mark.parametrize("kind", ["uniform", "descending", "ascending", "pyramid"])
def test_capacity_schedule_mean_is_the_base_and_shape_follows_kind(
    num_layers: int, kind: str
) -> None:
    factors = np.asarray(capacity_schedule(num_layers, 1.25, kind))
    assert factors.shape == (num_layers,)
    np.testing.assert_allclose(factors.mean(), 1.25, rtol=1e-12)
    assert np.all(factors >= 1.25 * 0.5 - 1e-12) and np.all(factors <= 1.25 * 1.5 + 1e-12)
    steps = np.diff(factors)
    if kind == "uniform" or num_layers == 1:
        np.testing.assert_allclose(factors, 1.25, rtol=1e-12)
    elif kind == "descending":
        assert np.all(steps < 0)
    elif kind == "ascending":
        assert np.all(steps > 0)
    else:
        peak = np.argmax(factors)
        assert np.all(steps[:peak] >= 0) and np.all(steps[peak:] <= 0)
        assert peak in ((num_layers - 1) // 2, num_layers // 2)
        if num_layers > 2:
            assert factors[peak] > factors[0] and factors[peak] > factors[-1]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 1.0, "uniform"), r"num_layers: got 0; allowed: an int >= 1"),
        ((4, 0.0, "uniform"), r"base_capacity_factor: got 0.0; allowed: finite and > 0"),
        ((4, 1.0, "wave"), r"kind: got 'wave'; allowed: uniform, descending, ascending, pyramid"),
        ((4, 1.0, "pyramid", 1.0), r"spread: got 1.0; allowed: in \[0, 1\)"),
    ],
)
def test_capacity_schedule_rejects_bad_arguments(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        capacity_schedule(*args)


def test_expert_capacity_formula() -> None:
    assert expert_capacity(4096, 4, 2, 1.25) == 2560
    assert expert_capacity(10, 3, 1, 1.0) == 4
    # 10 * 1.1 is 11.000000000000002 in floats; the capacity is still 11.
    assert expert_capacity(10, 1, 1, 1.1) == 11
    assert expert_capacity(1, 8, 1, 0.1) == 1


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((16, 4, 2, 0.0), "capacity_factor: got 0.0; allowed: finite and > 0"),
        ((16, 4, 2, float("nan")), "capacity_factor: got nan"),
        ((16, 0, 1, 1.0), "num_experts: got 0"),
        ((16, 4, 5, 1.0), "top_k: got 5"),
    ],
)
def test_expert_capacity_rejects_bad_arguments(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        expert_capacity(*args)
