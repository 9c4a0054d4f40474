"""RoMA on the synthetic multi-task proxy: answer accuracy of a briefly trained tiny MoE LM, of
its routers fine-tuned without the manifold regulariser, and with it (RoMA), over seeds.

    python benchmarks/roma.py [--seeds 0 1 2] [--pretrain_steps N] [--finetune_steps N]
        [--finetune_batches B] [--test_batches B] [--learning_rate LR]
        [--manifold_weight W] [--k K] [--length N] [--num_symbols V]

Each seed trains its own model (`roma_comparison` below); both fits start
from that seed's trained weights and see the same held-out split. Prints one row per seed and
the mean: test accuracy (all answer symbols right), the same on the fine-tuning split, and
the manifold loss at the start and end of each fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moejax.tasks import routing_tasks as rt  # noqa: E402
from moejax.tasks.roma import Comparison, RomaOptions, compare_fits  # noqa: E402

RUNS = ("trained", "router_only", "roma")


@dataclasses.dataclass(frozen=True)
class ComparisonConfig:
    """The experiment's sizes: `pretrain_steps` of full training, then router-only fine-tuning
    on `finetune_batches` held-out batches for `options.steps` steps, evaluated on
    `test_batches` further batches (each of `batch` samples)."""

    tasks: rt.RoutingTasksConfig = rt.RoutingTasksConfig()
    pretrain_steps: int = 300
    batch: int = 64
    finetune_batches: int = 4
    test_batches: int = 8
    options: RomaOptions = RomaOptions(steps=100, manifold_weight=1.0, k=4)
    seed: int = 0


def roma_comparison(config: ComparisonConfig) -> Comparison:
    """The experiment: a model trained `config.pretrain_steps` steps on fresh batches, then
    `compare_fits` on a held-out fine-tuning split and a test split drawn after it."""
    model = rt.routing_tasks_model(config.tasks, seed=config.seed)
    rt.train_lm(
        model, config.tasks, steps=config.pretrain_steps, batch=config.batch, seed=config.seed
    )
    rng = np.random.default_rng(config.seed + 1_000)
    finetune = [
        rt.routing_tasks_batch(config.tasks, config.batch, rng)
        for _ in range(config.finetune_batches)
    ]
    test = [
        rt.routing_tasks_batch(config.tasks, config.batch, rng) for _ in range(config.test_batches)
    ]
    return compare_fits(model, finetune, test, config.options, rt.task_accuracy)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain_steps", type=int, default=300)
    parser.add_argument("--finetune_steps", type=int, default=200)
    parser.add_argument("--finetune_batches", type=int, default=4)
    parser.add_argument("--test_batches", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--manifold_weight", type=float, default=1.0)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--length", type=int, default=6)
    parser.add_argument("--num_symbols", type=int, default=8)
    args = parser.parse_args(argv)

    options = RomaOptions(
        steps=args.finetune_steps,
        learning_rate=args.learning_rate,
        manifold_weight=args.manifold_weight,
        k=args.k,
    )
    tasks = rt.RoutingTasksConfig(num_symbols=args.num_symbols, length=args.length)
    print(f"{args}\n")
    header = " | ".join(f"{run} test / finetune" for run in RUNS)
    print(f"| seed | {header} | manifold router_only | manifold roma | seconds |")
    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        config = ComparisonConfig(
            tasks=tasks,
            pretrain_steps=args.pretrain_steps,
            finetune_batches=args.finetune_batches,
            test_batches=args.test_batches,
            options=options,
            seed=seed,
        )
        comparison = roma_comparison(config)
        result = comparison.accuracy
        rows.append([result[run][split]["all"] for split in ("test", "finetune") for run in RUNS])
        cells = " | ".join(
            f"{result[run]['test']['all']:.3f} / {result[run]['finetune']['all']:.3f}"
            for run in RUNS
        )
        manifold = [
            f"{h[0]['manifold_loss']:.4f} -> {h[-1]['manifold_loss']:.4f}"
            for h in (comparison.histories["router_only"], comparison.histories["roma"])
        ]
        seconds = time.perf_counter() - start
        print(f"| {seed} | {cells} | {manifold[0]} | {manifold[1]} | {seconds:.0f} |", flush=True)
    mean = np.mean(rows, axis=0)
    cells = " | ".join(f"{mean[i]:.3f} / {mean[i + len(RUNS)]:.3f}" for i in range(len(RUNS)))
    print(f"| mean | {cells} | | | |")
    differences = np.asarray(rows)[:, 2] - np.asarray(rows)[:, 1]
    print(f"\nroma - router_only, test accuracy per seed: {np.round(differences, 3).tolist()}")


if __name__ == "__main__":
    main()
