"""The lottery report: accuracy over seeds as mean ± sample standard deviation (ddof=1)."""

import numpy as np
import pytest

from moejax.tasks.lottery import LotteryConfig, _markdown, summarize


def _records(accuracies: list[float]) -> list[dict]:
    return [
        {"arm": "ticket", "round": 0, "remaining": 1.0, "seed": seed, "test_accuracy": accuracy}
        for seed, accuracy in enumerate(accuracies)
    ]


def test_summary_spread_over_seeds_is_the_sample_std() -> None:
    (row,) = summarize(_records([0.86, 0.87, 0.89]))
    assert row["accuracy_mean"] == pytest.approx(0.8733333, rel=1e-6)
    assert row["accuracy_std"] == pytest.approx(np.std([0.86, 0.87, 0.89], ddof=1), rel=1e-12)
    assert row["seeds"] == 3
    table = _markdown(LotteryConfig(rounds=1, seeds="0,1,2"), [row], seconds=1.0)
    assert "mean ± sample std, ddof=1, over seeds" in table
    assert f"| 0 | 100.0 | 87.33 ± {100 * row['accuracy_std']:.2f} | — | — |" in table


def test_one_seed_has_no_spread() -> None:
    (row,) = summarize(_records([0.86]))
    assert row["accuracy_std"] is None
    table = _markdown(LotteryConfig(rounds=1), [row], seconds=1.0)
    assert "| 0 | 100.0 | 86.00 | — | — |" in table
