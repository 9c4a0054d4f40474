"""The lottery-ticket experiment end to end: Fashion-MNIST through TFDS and grain, every seed,
and the results as `results.json`, `results.md` and `accuracy_vs_weights.png` in the workdir."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from moejax import plotting, stats
from moejax.data import fashion_mnist
from moejax.pruning.lottery import ARMS, LotteryConfig, run_seed

COLORS = {"ticket": (31, 119, 180), "reinit": (255, 127, 14), "random": (120, 120, 120)}


def load_data(config: LotteryConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels), building the dataset if needed."""
    data_dir = pathlib.Path(config.data_dir).expanduser().absolute()
    fashion_mnist.prepare(data_dir)
    train = fashion_mnist.load_arrays(data_dir, "train", config.train_limit or None)
    test = fashion_mnist.load_arrays(data_dir, "test", config.test_limit or None)
    return (*train, *test)


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (round, arm): remaining fraction, mean and sample standard deviation
    (`ddof=1`; None for one seed) of test accuracy over seeds."""
    rows = []
    rounds = sorted({r["round"] for r in records})
    for round_index in rounds:
        for arm in ARMS:
            group = [r for r in records if r["round"] == round_index and r["arm"] == arm]
            if not group:
                continue
            accuracy = np.array([r["test_accuracy"] for r in group])
            rows.append(
                {
                    "round": round_index,
                    "arm": arm,
                    "remaining": float(np.mean([r["remaining"] for r in group])),
                    "accuracy_mean": float(accuracy.mean()),
                    "accuracy_std": stats.sample_std(accuracy),
                    "seeds": len(group),
                }
            )
    return rows


def _markdown(config: LotteryConfig, rows: list[dict[str, Any]], seconds: float) -> str:
    dense = next(r for r in rows if r["round"] == 0 and r["arm"] == "ticket")
    lines = [
        f"# Lottery tickets: {config.model} on Fashion-MNIST",
        "",
        f"{config.rounds} rounds pruning {100 * config.prune_rate:g}% of each layer's remaining "
        f"weights (output layer {100 * config.output_prune_rate:g}%), {config.epochs} epochs "
        f"per round, Adam lr {config.learning_rate:g}, batch {config.batch_size}, rewind to "
        f"step {config.rewind_step}, seeds {config.seeds}; {seconds:.0f} s in all.",
        "Test accuracy (mean ± sample std, ddof=1, over seeds) after the last epoch of each "
        "round; `remaining` counts the weight matrices (biases are never pruned).",
        "",
        "| round | remaining % | ticket | reinit | random |",
        "|---:|---:|---:|---:|---:|",
    ]
    by_round: dict[int, dict[str, dict]] = {}
    for row in rows:
        by_round.setdefault(row["round"], {})[row["arm"]] = row
    for round_index, arms in sorted(by_round.items()):
        cells = [
            stats.format_spread(arms[a]["accuracy_mean"], arms[a]["accuracy_std"], 2, scale=100)
            if a in arms
            else "—"
            for a in ARMS
        ]
        remaining = 100 * arms["ticket"]["remaining"]
        lines.append(f"| {round_index} | {remaining:.1f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Claim: tickets at 10-20% of the weights are within 1 point of the dense "
        f"network ({100 * dense['accuracy_mean']:.2f}%) and beat random re-initialisation.",
    ]
    for _, arms in sorted(by_round.items()):
        remaining = arms["ticket"]["remaining"]
        if 0.10 <= remaining <= 0.20 and "reinit" in arms:
            gap = 100 * (arms["ticket"]["accuracy_mean"] - dense["accuracy_mean"])
            margin = 100 * (arms["ticket"]["accuracy_mean"] - arms["reinit"]["accuracy_mean"])
            verdict = "holds" if gap >= -1.0 and margin > 0 else "does not hold"
            lines.append(
                f"- {100 * remaining:.1f}% weights: ticket - dense = {gap:+.2f} points, "
                f"ticket - reinit = {margin:+.2f} points: {verdict}."
            )
    lines += [
        "",
        "`accuracy_vs_weights.png`: x = pruning round (weights remaining = 0.8^round of the "
        "hidden layers), y = test accuracy; blue = ticket, orange = random re-init, grey = "
        "random pruning. The image has no text; see the table for values.",
    ]
    return "\n".join(lines) + "\n"


def write_results(
    config: LotteryConfig, records: list[dict], workdir: pathlib.Path, seconds: float
) -> dict[str, Any]:
    """Writes results.json, results.md and the PNG; returns the JSON content."""
    workdir.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    content = {"config": dataclasses.asdict(config), "summary": rows, "runs": records}
    (workdir / "results.json").write_text(json.dumps(content, indent=2))
    (workdir / "results.md").write_text(_markdown(config, rows, seconds))
    curves = {
        arm: [[r["round"], r["accuracy_mean"]] for r in rows if r["arm"] == arm] for arm in ARMS
    }
    dense = [[0, r["accuracy_mean"]] for r in rows if r["round"] == 0 and r["arm"] == "ticket"]
    for arm in ("reinit", "random"):
        curves[arm] = dense + curves[arm]
    axes = plotting.plot_curves(curves, COLORS, workdir / "accuracy_vs_weights.png")
    content["plot_axes"] = axes
    return content


def run_experiment(
    config: LotteryConfig, workdir: pathlib.Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Runs every seed and writes the results into `workdir`."""
    start = time.perf_counter()
    data = load_data(config)
    log(f"data: {len(data[1])} train / {len(data[3])} test images")
    records = []
    for seed in config.seed_list():
        records += run_seed(config, data, seed, log)
    seconds = time.perf_counter() - start
    content = write_results(config, records, workdir, seconds)
    if not all(math.isfinite(r["test_accuracy"]) for r in records):
        raise FloatingPointError("a lottery run ended with a non-finite accuracy")
    return content
