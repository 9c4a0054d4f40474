"""The spread of repeated measurements (seeds, random draws) as the report tables print it."""

from collections.abc import Sequence

import numpy as np


def sample_std(values: Sequence[float] | np.ndarray) -> float | None:
    """Sample standard deviation (`ddof=1`) of repeated measurements, or None for fewer than
    two (then it is undefined).

    A few seeds estimate the spread of a run-to-run distribution; the population formula
    (`ddof=0`) understates it, by a factor sqrt(2/3) for three seeds.
    """
    values = np.asarray(values, np.float64).reshape(-1)
    if values.size < 2:
        return None
    return float(np.std(values, ddof=1))


def format_spread(mean: float, std: float | None, digits: int, scale: float = 1.0) -> str:
    """`"mean ± std"` times `scale` with `digits` decimals; the mean alone when `std` is None."""
    text = f"{scale * mean:.{digits}f}"
    return text if std is None else f"{text} ± {scale * std:.{digits}f}"


def mean_and_spread(values: Sequence[float] | np.ndarray, digits: int) -> str:
    """`"mean ± sample std"` of `values` with `digits` decimals; the mean alone for one value."""
    return format_spread(float(np.mean(values)), sample_std(values), digits)
