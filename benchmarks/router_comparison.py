"""Trains the same language model with different routers and compares them.

    python benchmarks/router_comparison.py [--steps N] [--seeds 0 1 ...] [--routers NAME ...]
        [--out DIR] [--config configs/router_comparison.py] [--override group.field=value ...]

Every router trains the base config (`--config`, with `--override`s and `--steps` applied) with
only its router fields changed (`ROUTER_VARIANTS`), on the same data order and from the same seed:
seed k sets both `train.seed` and `data.shuffle_seed`. Run k of router r trains in
`DIR/<r>/seed<k>` (an existing directory there is replaced), then its final checkpoint is
evaluated on the whole validation split. A run that fails is recorded with its error and the
benchmark goes on. After every run the script rewrites

- `DIR/results.json`: settings, every run, and one summary row per router;
- `DIR/results.md`: the comparison table, the settings, the seed noise and the plot's legend;
- `DIR/validation_curves.png`: validation bits/byte against step, one line per router (the
  mean over seeds, with labelled axes and a legend (matplotlib).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moejax import cli, evaluation, plotting  # noqa: E402
from moejax import config as config_lib  # noqa: E402
from moejax.config import Config, ModelConfig  # noqa: E402
from moejax.training import allocator  # noqa: E402

log = logging.getLogger("router_comparison")

BASELINE = "softmax_top_k"
# BlockFFN's sparsity objectives: the L1 term is about 2-4 per token and the chunk term lies in
# [0, 1], so at 0.01 each adds a few hundredths of a nat to a loss of about 1.5 nats: enough to
# push towards sparse activations without trading much language-model loss in a short run.
RELU_SPARSITY_WEIGHT = 0.01
CHUNK_SPARSITY_WEIGHT = 0.01

# Router name -> the config overrides of its variant (`group.field=value`), given the base model.
ROUTER_VARIANTS: dict[str, Callable[[ModelConfig], list[str]]] = {
    "softmax_top_k": lambda model: ["model.router.name=softmax_top_k"],
    # The transport plan balances the experts, replacing the balancing loss.
    "selective_sinkhorn": lambda model: [
        "model.router.name=selective_sinkhorn",
        "model.router.load_balance_weight=0",
    ],
    "cosine": lambda model: ["model.router.name=cosine"],
    "hash_layer": lambda model: ["model.router.name=hash_layer"],
    "random_fixed": lambda model: ["model.router.name=random_fixed"],
    # Parameter-free: there are no router logits to balance or to keep small.
    "kmeans": lambda model: [
        "model.router.name=kmeans",
        "model.router.load_balance_weight=0",
        "model.router.router_z_weight=0",
    ],
    # Every expert has a slot, so the ReLU decides how many are active per token.
    "relu_rmsnorm": lambda model: [
        "model.router.name=relu_rmsnorm",
        "model.router.options.renormalize=false",
        f"model.moe.top_k={model.moe.num_experts}",
        f"model.router.options.sparsity_weight={RELU_SPARSITY_WEIGHT}",
        f"model.router.options.chunk_sparsity_weight={CHUNK_SPARSITY_WEIGHT}",
    ],
    # Per-expert biases balance the load instead of a loss.
    "bias_balanced": lambda model: [
        "model.router.name=bias_balanced",
        "model.router.load_balance_weight=0",
    ],
    # No MoE layer; the feed-forward is as wide as the experts a token uses.
    "dense": lambda model: [
        "model.moe.every=0",
        f"model.d_ff={model.moe.top_k * model.moe.expert_d_ff}",
    ],
}

# Per-layer routing statistics of `moejax.training.evaluate`, reported as means over MoE layers.
ROUTING_METRICS = {
    "imbalance": "load_max_over_mean",
    "entropy": "routing_entropy",
    "token_sparsity": "token_sparsity",
    "chunk_sparsity": "chunk_sparsity",
}

# Tableau's ten colours: (name, RGB).
PALETTE = [
    ("blue", (31, 119, 180)),
    ("orange", (255, 127, 14)),
    ("green", (44, 160, 44)),
    ("red", (214, 39, 40)),
    ("purple", (148, 103, 189)),
    ("brown", (140, 86, 75)),
    ("pink", (227, 119, 194)),
    ("grey", (127, 127, 127)),
    ("olive", (188, 189, 34)),
    ("cyan", (23, 190, 207)),
]


# ----------------------------------------------------------------------------- configs


def variant_config(base: Config, router: str, seed: int) -> Config:
    """`base` with the router variant's overrides and `seed` as init and data seed."""
    if router not in ROUTER_VARIANTS:
        raise ValueError(f"router: got {router!r}; allowed: {', '.join(ROUTER_VARIANTS)}")
    variant = config_lib.apply_overrides(base, ROUTER_VARIANTS[router](base.model))
    return dataclasses.replace(
        variant,
        data=dataclasses.replace(base.data, shuffle_seed=seed),
        train=dataclasses.replace(base.train, seed=seed),
    )


def with_steps(config: Config, steps: int) -> Config:
    """`config` trained for `steps` steps, its warmup shortened to fit if needed."""
    train = dataclasses.replace(
        config.train, steps=steps, warmup_steps=min(config.train.warmup_steps, steps)
    )
    return dataclasses.replace(config, train=train)


# ----------------------------------------------------------------------------- one run


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` file, in order."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def layer_mean(results: dict[str, Any], name: str) -> float | None:
    """Mean of `moe/layer{i}/<name>` over the MoE layers; None for a model without them."""
    layers = evaluation.moe_layers(results)
    if not layers:
        return None
    return float(np.mean([float(results[f"moe/{layer}/{name}"]) for layer in layers]))


def run_one(config: Config, workdir: Path) -> dict[str, Any]:
    """Trains `config` from scratch in `workdir`, evaluates it on the whole validation split."""
    from moejax.training.loop import train

    if workdir.exists():
        shutil.rmtree(workdir)
    start = time.perf_counter()
    trained = train(config, workdir, progress=False)
    results = evaluation.evaluate_workdir(workdir, overrides=["data.eval_batches=0"])
    records = read_metrics(workdir / "metrics.jsonl")
    train_records = [r for r in records if r["split"] == "train"]
    return {
        "step": trained.step,
        "loss": float(results["loss"]),
        "bits_per_byte": float(results["bits_per_byte"]),
        "validation_tokens": float(results["tokens"]),
        **{key: layer_mean(results, name) for key, name in ROUTING_METRICS.items()},
        "tokens_per_second": (
            float(train_records[-1]["tokens_per_second"]) if train_records else None
        ),
        # Evaluated during training on data.eval_batches batches, not the whole split.
        "curve": [[r["step"], float(r["bits_per_byte"])] for r in records if r["split"] == "eval"],
        "wall_seconds": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------- summary


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def _mean_curve(curves: Sequence[Sequence[Sequence[float]]]) -> list[list[float]]:
    """The mean over runs of [[step, value], ...] curves, at every step any run reports."""
    by_step: dict[int, list[float]] = {}
    for curve in curves:
        for step, value in curve:
            by_step.setdefault(int(step), []).append(value)
    return [[step, float(np.mean(values))] for step, values in sorted(by_step.items())]


def summarise(runs: Sequence[dict[str, Any]], routers: Sequence[str]) -> list[dict[str, Any]]:
    """One row per router: means over its successful seeds, their bits/byte spread, errors."""
    rows = []
    for router in routers:
        mine = [run for run in runs if run["router"] == router]
        done = [run for run in mine if "error" not in run]
        bits = [run["bits_per_byte"] for run in done]
        row: dict[str, Any] = {
            "router": router,
            "seeds": [run["seed"] for run in done],
            "errors": [f"seed {run['seed']}: {run['error']}" for run in mine if "error" in run],
            "bits_per_byte_mean": _mean(bits),
            # Sample standard deviation over seeds; undefined for one seed.
            "bits_per_byte_std": float(np.std(bits, ddof=1)) if len(bits) > 1 else None,
            "loss_mean": _mean([run["loss"] for run in done]),
            **{key: _mean([run[key] for run in done]) for key in ROUTING_METRICS},
            "tokens_per_second": _mean([run["tokens_per_second"] for run in done]),
            "curve": _mean_curve([run["curve"] for run in done]),
        }
        rows.append(row)
    baseline = next((r for r in rows if r["router"] == BASELINE), None)
    reference = baseline["bits_per_byte_mean"] if baseline else None
    for row in rows:
        mean = row["bits_per_byte_mean"]
        row[f"vs_{BASELINE}_percent"] = (
            100.0 * (mean / reference - 1.0) if mean is not None and reference else None
        )
    return rows


# ----------------------------------------------------------------------------- report


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cell(text: str) -> str:
    """Text that cannot break a markdown table row."""
    return " ".join(text.split()).replace("|", "\\|")


def markdown_report(
    rows: Sequence[dict[str, Any]],
    settings: dict[str, Any],
    legend: dict[str, str],
) -> str:
    """results.md: the table, the regime it is in, the settings, seed noise and plot legend."""
    steps, tokens = settings["steps"], settings["tokens_per_step"]
    lines = [
        "# Router comparison",
        "",
        f"Short CPU runs ({steps} steps, {steps * tokens:,} training tokens per run) measure "
        "early learning speed, not converged quality: a router that learns fast early can be "
        "overtaken later, and differences smaller than the seed noise below are not evidence.",
        "",
        f"| router | seeds | val bits/byte | vs {BASELINE} | imbalance (max/mean) | entropy (nats) "
        "| token sparsity | chunk sparsity | tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        mean, std = row["bits_per_byte_mean"], row["bits_per_byte_std"]
        if mean is None and row["errors"]:
            bits = "failed: " + _cell("; ".join(row["errors"]))[:200]
        elif mean is None:
            bits = "not run yet"
        else:
            bits = f"{mean:.4f}" + ("" if std is None else f" ± {std:.4f}")
        vs = row[f"vs_{BASELINE}_percent"]
        lines.append(
            f"| {row['router']} | {' '.join(map(str, row['seeds'])) or '-'} | {bits} "
            f"| {_number(vs, '+.2f')}{'' if vs is None else '%'} "
            f"| {_number(row['imbalance'], '.3f')} | {_number(row['entropy'], '.3f')} "
            f"| {_number(row['token_sparsity'], '.3f')} | {_number(row['chunk_sparsity'], '.3f')} "
            f"| {_number(row['tokens_per_second'], ',.0f')} |"
        )
    lines += [
        "",
        "Validation bits/byte on the whole validation split, mean ± sample std over seeds. "
        "Imbalance, entropy and sparsities are validation means over MoE layers; tokens/s is "
        "the training throughput of the last logging interval. `-`: not defined (no MoE layer, "
        "one seed, or no baseline).",
        "",
        "## Seed noise",
        "",
        "Standard deviation of validation bits/byte across seeds:",
        "",
    ]
    for row in rows:
        lines.append(f"- {row['router']}: {_number(row['bits_per_byte_std'], '.4f')}")
    failures = [f"- {row['router']}, {error}" for row in rows for error in row["errors"]]
    if failures:
        lines += ["", "## Failed runs", "", *(_cell(f) for f in failures)]
    lines += [
        "",
        "## Validation curves",
        "",
        "`validation_curves.png`: validation bits/byte (on the first "
        f"{settings['curve_eval_batches']} validation batches, during training) against step, "
        "mean over seeds. The y axis spans the values after step 0: segments from the "
        "untrained model at step 0 leave the top of the plot.",
        "",
        "| colour | router |",
        "|---|---|",
        *(f"| {color} | {router} |" for router, color in legend.items()),
        "",
        "## Settings",
        "",
        f"- command: `{settings['command']}`",
        f"- base config: `{settings['config']}`, overrides: {settings['overrides'] or 'none'}",
        f"- seeds: {' '.join(map(str, settings['seeds']))} (each sets train.seed and "
        "data.shuffle_seed: every router sees the same batches from the same init seed)",
        f"- device: {settings['device']}; {settings['cpu_count']} CPU cores",
        f"- total wall time: {settings['wall_seconds'] / 60:.1f} min",
        "",
        "Base config:",
        "",
        "```",
        settings["describe"],
        "```",
        "",
        "Router variants (model fields changed from the base config):",
        "",
        *(f"- {name}: {_cell(fields)}" for name, fields in settings["variants"].items()),
        "",
    ]
    return "\n".join(lines)


def _range_after_step_zero(curves: dict[str, list[list[float]]]) -> tuple[float, float] | None:
    """y limits over the points after step 0, padded by 5%: an untrained model's ~8 bits/byte
    would flatten every other difference."""
    later = [value for curve in curves.values() for step, value in curve if step > 0]
    if not later:
        return None
    low, high = min(later), max(later)
    pad = 0.05 * (high - low) if high > low else 0.05
    return low - pad, high + pad


def write_outputs(
    out: Path, runs: list[dict[str, Any]], routers: Sequence[str], settings: dict[str, Any]
) -> list[dict[str, Any]]:
    """Writes results.json, validation_curves.png and results.md; returns the summary rows."""
    rows = summarise(runs, routers)
    names = {router: PALETTE[i % len(PALETTE)] for i, router in enumerate(routers)}
    curves = {row["router"]: row["curve"] for row in rows}
    figure = plotting.curves_figure(
        curves,
        title="Validation bits/byte during training (mean over seeds)",
        xlabel="step",
        ylabel="validation bits/byte",
        colors={router: rgb for router, (_, rgb) in names.items()},
        y_range=_range_after_step_zero(curves),
    )
    plotting.save_png(figure, out / "validation_curves.png")
    legend = {router: f"{color} #{bytes(rgb).hex()}" for router, (color, rgb) in names.items()}
    (out / "results.json").write_text(
        json.dumps(
            {"settings": settings, "rows": rows, "runs": runs, "legend": legend},
            indent=2,
        )
        + "\n"
    )
    (out / "results.md").write_text(markdown_report(rows, settings, legend))
    return rows


# ----------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "router_comparison.py"))
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="GROUP.FIELD=VALUE",
        help="change one field of the base config (repeatable)",
    )
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: config)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--routers", nargs="+", default=list(ROUTER_VARIANTS), choices=list(ROUTER_VARIANTS)
    )
    parser.add_argument("--out", default="workdir/router_comparison")
    args = parser.parse_args(argv)
    cli.setup_logging()

    import jax

    try:
        base = config_lib.apply_overrides(config_lib.load_config_file(args.config), args.override)
        if args.steps is not None:
            if args.steps < 1:
                raise config_lib.ConfigError(f"--steps: got {args.steps}; allowed: >= 1")
            base = with_steps(base, args.steps)
        config_lib.validate(base, jax.device_count())
    except config_lib.ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    settings: dict[str, Any] = {
        "command": shlex.join(["python", "benchmarks/router_comparison.py", *argv]),
        "config": args.config,
        "overrides": args.override,
        "steps": base.train.steps,
        "seeds": args.seeds,
        "routers": args.routers,
        "tokens_per_step": base.data.global_batch_size * base.data.seq_len,
        "curve_eval_batches": base.data.eval_batches,
        "device": f"{jax.device_count()} x {device.platform} ({device.device_kind})",
        "cpu_count": os.cpu_count(),
        "describe": config_lib.describe(base),
        "base_config": config_lib.to_dict(base),
        "variants": {name: ", ".join(ROUTER_VARIANTS[name](base.model)) for name in args.routers},
        "wall_seconds": 0.0,
    }
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    # Seed-major order: an interrupted benchmark still compares every router on the first seeds.
    for seed in args.seeds:
        for router in args.routers:
            workdir = out / router / f"seed{seed}"
            run: dict[str, Any] = {"router": router, "seed": seed, "workdir": str(workdir)}
            try:
                run.update(run_one(variant_config(base, router, seed), workdir))
                log.info(
                    "%s seed %d: %.4f bits/byte in %.0f s",
                    router,
                    seed,
                    run["bits_per_byte"],
                    run["wall_seconds"],
                )
            # A failing router is recorded and must not stop the others.
            except Exception as error:
                log.exception("%s seed %d failed", router, seed)
                run["error"] = f"{type(error).__name__}: {error}"
            runs.append(run)
            settings["wall_seconds"] = time.perf_counter() - start
            write_outputs(out, runs, args.routers, settings)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    # Process-wide, so the program sets it and the library never does; before main()
    # starts JAX's backend (moejax/training/allocator.py says why).
    allocator.tune_malloc()
    sys.exit(main())
