"""Pruning the MoE language model's expert weights: two experiments on CPU.

    python benchmarks/pruning_lm.py --out DIR [--steps 300] [--finetune_steps 100]
        [--calibration_batches 8] [--dsnot_cycles 50] [--eval_batches 0]

1. SR-STE: `configs/prune_srste.py` (2:4 on the expert weights, trained from scratch) against
   the same model with dense weights (`configs/router_comparison.py`), same steps, data and
   seed. Is the 2:4 model's validation loss within 3% of the dense one?
2. One-shot pruning of the trained dense run: magnitude masks at 50% of the expert weights,
   then DSnoT (*Dynamic Sparse No Training*) refines them with calibration activations from
   the training split (no backprop), then `configs/prune_finetune.py` fine-tunes with the
   masks fixed. Validation loss after each stage.

Every loss in the tables is the mean next-byte loss (nats) on the same validation batches
(`--eval_batches 0`: the whole split), computed by the same eval step. DIR gets `dense/`,
`srste/`, `finetune/` (training runs), `results.json` and `results.md`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moejax import cli  # noqa: E402
from moejax import config as config_lib  # noqa: E402
from moejax.config import Config  # noqa: E402
from moejax.parallel import sharding  # noqa: E402
from moejax.pruning import apply_masks  # noqa: E402
from moejax.training import allocator, corpus  # noqa: E402
from moejax.training import pruning as prune_lm  # noqa: E402
from moejax.training import state as state_lib  # noqa: E402
from moejax.training.checkpoint import Checkpointer  # noqa: E402
from moejax.training.evaluate import evaluate  # noqa: E402
from moejax.training.loop import train  # noqa: E402
from moejax.training.restore import restore_checkpoint  # noqa: E402
from moejax.training.step import make_eval_step  # noqa: E402
from moejax.training.workdir import CHECKPOINT_DIR  # noqa: E402

SRSTE_TOLERANCE = 0.03


def _load(name: str, steps: int) -> Config:
    config = config_lib.load_config_file(ROOT / "configs" / f"{name}.py")
    train_cfg = dataclasses.replace(
        config.train, steps=steps, warmup_steps=min(config.train.warmup_steps, steps)
    )
    return dataclasses.replace(config, train=train_cfg)


class Evaluator:
    """Validation loss of model variables on fixed batches, on a one-axis data mesh."""

    def __init__(self, config: Config, eval_batches: int):
        self.mesh = sharding.make_mesh(config_lib.validate(config, jax.device_count()))
        self.batches = corpus.eval_batches(config.data, eval_batches)

    def layout(self, config: Config) -> state_lib.StateLayout:
        return state_lib.state_layout(config, self.mesh)

    def restore(self, config: Config, workdir: Path) -> dict[str, Any]:
        return restore_checkpoint(workdir, config, self.layout(config).restore_target()).state

    def loss(self, config: Config, variables: dict[str, Any]) -> dict[str, float]:
        layout = self.layout(config)
        variables = jax.device_put(
            variables,
            {
                "params": layout.shardings["params"],
                "router_state": layout.shardings.get("router_state", {}),
            },
        )
        results = evaluate(make_eval_step(layout, self.mesh), variables, self.batches)
        return {"loss": results["loss"], "bits_per_byte": results["bits_per_byte"]}


def _train(config: Config, workdir: Path, log, *, fresh: bool = True) -> float:
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    start = time.perf_counter()
    result = train(config, workdir, progress=False)
    seconds = time.perf_counter() - start
    log(f"{workdir.name}: {result.step} steps in {seconds:.0f} s")
    return seconds


def _expert_sparsity(config: Config, params: Any) -> float:
    return prune_lm.param_sparsity(config.pruning, params)["sparsity/prunable"]


def srste_experiment(args, evaluator: Evaluator, log) -> dict[str, Any]:
    dense_cfg, srste_cfg = _load("router_comparison", args.steps), _load("prune_srste", args.steps)
    rows = {}
    for name, config in (("dense", dense_cfg), ("srste_2of4", srste_cfg)):
        seconds = _train(config, args.out / name, log)
        state = evaluator.restore(config, args.out / name)
        variables = state_lib.model_variables(state)
        rows[name] = {
            **evaluator.loss(config, variables),
            "expert_sparsity": _expert_sparsity(srste_cfg, jax.device_get(variables["params"])),
            "train_seconds": seconds,
        }
        log(f"{name}: validation loss {rows[name]['loss']:.4f}")
    gap = rows["srste_2of4"]["loss"] / rows["dense"]["loss"] - 1.0
    return {"rows": rows, "relative_gap": gap, "within_tolerance": gap <= SRSTE_TOLERANCE}


def _calibration(config: Config, batches: int) -> list[np.ndarray]:
    """`batches` token batches [batch, length] from the training split, in an order other
    than the training runs' (another shuffle seed)."""
    iterator = corpus.train_iterator(config.data, seed_offset=10_007, num_workers=0)
    try:
        return [np.asarray(next(iterator)["inputs"]) for _ in range(batches)]
    finally:
        iterator.close()


def _seed_finetune(config: Config, workdir: Path, evaluator: Evaluator, variables, masks) -> None:
    """Writes a step-0 checkpoint of `config` holding the pruned params and `masks`, so that
    `train` resumes from it: fresh AdamW moments, the fixed masks in the optimizer state."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    config_lib.save_json(config, workdir / "config.json")
    layout = evaluator.layout(config)
    params = apply_masks(variables["params"], masks)
    state = {
        "step": np.int32(0),
        "params": params,
        "opt_state": prune_lm.with_masks(layout.optimizer.init(params), masks),
    }
    if "router_state" in layout.abstract_state:
        state["router_state"] = variables["router_state"]
    state = jax.device_put(state, layout.shardings)
    iterator = corpus.train_iterator(config.data)
    checkpointer = Checkpointer(workdir / CHECKPOINT_DIR, keep=1, async_save=False)
    try:
        checkpointer.save(0, state, iterator.get_state())
    finally:
        checkpointer.close()
        iterator.close()


def one_shot_experiment(args, evaluator: Evaluator, log) -> dict[str, Any]:
    dense_cfg = _load("router_comparison", args.steps)
    finetune_cfg = _load("prune_finetune", args.finetune_steps)
    if not (args.out / "dense" / CHECKPOINT_DIR).exists():
        _train(dense_cfg, args.out / "dense", log)
    state = evaluator.restore(dense_cfg, args.out / "dense")
    variables = jax.device_get(state_lib.model_variables(state))
    rows = {"dense": evaluator.loss(dense_cfg, variables)}

    masks = jax.device_get(prune_lm.one_shot_masks(finetune_cfg.pruning, variables["params"]))
    pruned = {**variables, "params": apply_masks(variables["params"], masks)}
    rows["magnitude_50"] = evaluator.loss(dense_cfg, pruned)
    log(f"magnitude 50%: validation loss {rows['magnitude_50']['loss']:.4f}")

    start = time.perf_counter()
    prunable = prune_lm.prunable_params(finetune_cfg.pruning, variables["params"])
    layout = evaluator.layout(dense_cfg)
    refined, dsnot_report = prune_lm.dsnot_refine_moe(
        layout.spec.merge,
        variables,
        masks,
        prunable,
        _calibration(dense_cfg, args.calibration_batches),
        max_cycles=args.dsnot_cycles,
    )
    dsnot_seconds = time.perf_counter() - start
    refined_vars = {**variables, "params": apply_masks(variables["params"], refined)}
    rows["magnitude_50_dsnot"] = evaluator.loss(dense_cfg, refined_vars)
    log(f"+ DSnoT ({dsnot_seconds:.0f} s): {rows['magnitude_50_dsnot']['loss']:.4f}")

    _seed_finetune(finetune_cfg, args.out / "finetune", evaluator, variables, refined)
    seconds = _train(finetune_cfg, args.out / "finetune", log, fresh=False)
    tuned = state_lib.model_variables(evaluator.restore(finetune_cfg, args.out / "finetune"))
    rows["magnitude_50_dsnot_finetune"] = evaluator.loss(finetune_cfg, tuned)
    log(f"+ fine-tune: {rows['magnitude_50_dsnot_finetune']['loss']:.4f}")

    sparsities = {
        "magnitude_50": _expert_sparsity(finetune_cfg, pruned["params"]),
        "magnitude_50_dsnot": _expert_sparsity(finetune_cfg, refined_vars["params"]),
        "magnitude_50_dsnot_finetune": _expert_sparsity(
            finetune_cfg, jax.device_get(tuned["params"])
        ),
        "dense": _expert_sparsity(finetune_cfg, variables["params"]),
    }
    flips = sum(
        int(np.sum(a != b))
        for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(refined), strict=True)
    )
    for name, row in rows.items():
        row["expert_sparsity"] = sparsities[name]
    return {
        "rows": rows,
        "dsnot": {"layers": dsnot_report, "seconds": dsnot_seconds, "mask_entries_changed": flips},
        "finetune_seconds": seconds,
    }


LABELS = {
    "dense": "dense (trained)",
    "srste_2of4": "2:4 SR-STE experts",
    "magnitude_50": "magnitude 50% experts",
    "magnitude_50_dsnot": "+ DSnoT",
    "magnitude_50_dsnot_finetune": "+ fine-tune (masks fixed)",
}


def _table(rows: dict[str, dict[str, float]], reference: float) -> list[str]:
    lines = [
        "| model | val loss (nats) | bits/byte | vs dense | expert sparsity |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {LABELS[name]} | {row['loss']:.4f} | {row['bits_per_byte']:.4f} | "
            f"{100 * (row['loss'] / reference - 1):+.2f}% | {row['expert_sparsity']:.3f} |"
        )
    return lines


def write_report(out: Path, settings: dict, srste: dict | None, one_shot: dict | None) -> None:
    results = {"settings": settings, "srste": srste, "one_shot": one_shot}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Pruning the MoE language model's expert weights",
        "",
        f"Model and data: `configs/router_comparison.py` ({settings['steps']} steps on CPU);"
        " expert weights = `w_gate`, `w_up`, `w_down` of the MoE layers. Losses: mean"
        f" next-byte loss on {settings['validation_tokens']:,.0f} validation bytes.",
        "",
    ]
    if srste is not None:
        dense = srste["rows"]["dense"]["loss"]
        verdict = "yes" if srste["within_tolerance"] else "no"
        lines += [
            "## 1. 2:4 SR-STE from scratch vs dense weights (same steps, data, seed)",
            "",
            *_table(srste["rows"], dense),
            "",
            f"Within {100 * SRSTE_TOLERANCE:.0f}% of dense: **{verdict}** "
            f"({100 * srste['relative_gap']:+.2f}%).",
            "",
        ]
    if one_shot is not None:
        dsnot = one_shot["dsnot"]
        before = sum(r["error_before"] for r in dsnot["layers"].values())
        after = sum(r["error_after"] for r in dsnot["layers"].values())
        lines += [
            "## 2. One-shot magnitude pruning, DSnoT, fine-tuning",
            "",
            *_table(one_shot["rows"], one_shot["rows"]["dense"]["loss"]),
            "",
            f"DSnoT: {settings['calibration_tokens']:,} calibration tokens from the training"
            f" split, at most {settings['dsnot_cycles']} swap cycles per matrix,"
            f" {dsnot['seconds']:.0f} s; {dsnot['mask_entries_changed']:,} mask entries changed;"
            f" summed |expected reconstruction error| over all expert columns {before:.2f} ->"
            f" {after:.2f}. Fine-tuning: {settings['finetune_steps']} steps"
            " (`configs/prune_finetune.py`) on top of the dense run's, so a fine-tuned loss"
            " below dense means the 50% sparse model recovers the cut with steps to spare, not"
            " that pruning improves the model. One seed each; the seed-to-seed spread was not"
            " measured.",
            "",
        ]
    (out / "results.md").write_text("\n".join(lines))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("workdir/pruning_lm"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--finetune_steps", type=int, default=100)
    parser.add_argument("--calibration_batches", type=int, default=8)
    parser.add_argument("--dsnot_cycles", type=int, default=50)
    parser.add_argument("--eval_batches", type=int, default=0, help="0: whole validation split")
    parser.add_argument("--only", choices=("srste", "one_shot"), default=None)
    args = parser.parse_args(argv)
    cli.setup_logging()
    args.out = args.out.absolute()
    args.out.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    base = _load("router_comparison", args.steps)
    evaluator = Evaluator(base, args.eval_batches)
    settings = {
        "steps": args.steps,
        "finetune_steps": args.finetune_steps,
        "calibration_tokens": args.calibration_batches
        * base.data.global_batch_size
        * base.data.seq_len,
        "dsnot_cycles": args.dsnot_cycles,
        "validation_tokens": sum(math.prod(b["targets"].shape) for b in evaluator.batches),
        "devices": jax.device_count(),
        "command": " ".join(["python", "benchmarks/pruning_lm.py", *argv]),
    }
    srste = one_shot = None
    if args.only in (None, "srste"):
        srste = srste_experiment(args, evaluator, log)
        write_report(args.out, settings, srste, one_shot)
    if args.only in (None, "one_shot"):
        one_shot = one_shot_experiment(args, evaluator, log)
        write_report(args.out, settings, srste, one_shot)
    log((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    # Process-wide, so the program sets it and the library never does; before main()
    # starts JAX's backend (moejax/training/allocator.py says why).
    allocator.tune_malloc()
    sys.exit(main(sys.argv[1:]))
