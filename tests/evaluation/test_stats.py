"""The spread over seeds: sample standard deviation (ddof=1), as the report tables print it."""

import importlib.util
import json
import math
import pathlib

import numpy as np
import pytest

from moejax import stats

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_sample_std_divides_by_n_minus_one() -> None:
    # Mean 3; squared deviations 4, 1, 9 sum to 14: sqrt(14 / 2), not the population sqrt(14 / 3).
    assert stats.sample_std([1.0, 2.0, 6.0]) == pytest.approx(math.sqrt(7.0), rel=1e-12)
    assert stats.sample_std(np.array([2.0, 2.0])) == 0.0


@pytest.mark.parametrize("values", [[], [0.5]])
def test_sample_std_is_undefined_below_two_values(values: list[float]) -> None:
    assert stats.sample_std(values) is None


def test_spread_formatting_prints_the_mean_alone_without_a_spread() -> None:
    assert stats.mean_and_spread([1.0, 2.0, 6.0], digits=3) == "3.000 ± 2.646"
    assert stats.mean_and_spread([0.25], digits=2) == "0.25"
    assert stats.format_spread(0.8715, 0.0052, 2, scale=100) == "87.15 ± 0.52"
    assert stats.format_spread(0.8715, None, 2, scale=100) == "87.15"


def test_mqar_seed_table_reports_the_sample_std(tmp_path: pathlib.Path) -> None:
    spec = importlib.util.spec_from_file_location("mqar_benchmark", ROOT / "benchmarks/mqar.py")
    mqar = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mqar)
    folders = []
    for seed, accuracy in enumerate([0.2, 0.5, 0.9]):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        setup = {"seed": seed, "routed_tokens": 128, "query_block": 64}
        run = {"name": "dense", "accuracy": accuracy, "routing_recall": 1.0, "density": 1.0}
        (folder / "results.json").write_text(json.dumps({"setup": setup, "runs": [run]}))
        folders.append(folder)
    mqar.aggregate(tmp_path, folders)
    table = (tmp_path / "seeds.md").read_text()
    assert "sample std, ddof=1" in table
    std = np.std([0.2, 0.5, 0.9], ddof=1)
    assert f"| dense | 0.533 ± {std:.3f} | 1.000 ± 0.000 | 1.000 |" in table
