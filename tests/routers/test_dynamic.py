"""Expert capacity over depth (routers/dynamic.py): the schedules of DynaMoE."""

import numpy as np
import pytest

from moejax.routers.dynamic import capacity_schedule


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
