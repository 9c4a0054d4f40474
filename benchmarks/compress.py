"""Compressing a trained LM after training: validation bits/byte of every `python -m
moejax.compress` method, over several draws of calibration data.

    python benchmarks/compress.py --workdir W [--dense_workdir D] [--calib_batches 8]
        [--draws 3] [--sections prune,experts,quantize,readme]

Each row compresses W's newest checkpoint with `moejax.compress.compress` into a temporary
workdir and evaluates it as `eval.py` does (the run's validation batches), next to the dense
model, all in one run. Draw d calibrates on the training batches d * calib_batches ..
(d + 1) * calib_batches - 1. Sections:

- prune: magnitude, Wanda, SparseGPT, each without and with DSnoT, at 50% unstructured and
  2:4, and ARMOR at 2:4; the relative layer error is the mean over the feed-forward weights of
  ||X w - X w'||² / ||X w||² on their calibration inputs;
- experts: half of every MoE layer's experts kept by routing frequency, by router importance,
  or merged (MC-SMoE);
- quantize: round-to-nearest, GPTQ, EAQuant at 4 and 3 bits (groups of 32), mixed precision,
  GQSA (4 bits, half the groups), with the routers' top-k agreement with the float model;
- readme: D (a dense run) MoE-fied into 4 experts, 2 and 4 per token.

Rows whose result depends on the calibration draw and that take seconds (Wanda, SparseGPT,
expert-level) run `--draws` draws; the others one. Prints one table per section (mean ± sample
std over the draws; no ± for one draw) and the mean compression time.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from moejax import stats
from moejax.compress import Request, compress
from moejax.evaluation import evaluate_workdir

# Each row: (label, request, whether its result depends on the calibration draw). Rows that
# do not (magnitude) or that take minutes per draw (the refinements, ARMOR, quantisation) run
# one draw; the claims the issue checks (Wanda and SparseGPT against magnitude) run `--draws`.
Row = tuple[str, Request, bool]


def _prune_rows() -> list[Row]:
    rows = []
    for pattern, nm in (("50% unstructured", None), ("2:4", (2, 4))):
        for method in ("magnitude", "wanda", "sparsegpt", "armor"):
            if method == "armor" and nm is None:
                continue  # ARMOR is semi-structured
            for refine in (None, "dsnot"):
                name = method if refine is None else f"{method} + {refine}"
                drawn = method in ("wanda", "sparsegpt") and refine is None
                rows.append((f"{name} | {pattern}", Request(method, nm=nm, refine=refine), drawn))
    return rows


def _expert_rows(num_experts: int) -> list[Row]:
    keep = num_experts // 2
    return [
        (f"{method} | {keep} of {num_experts}", Request(method, keep_experts=keep), True)
        for method in ("frequency", "importance", "mc_smoe")
    ]


def _quantize_rows() -> list[Row]:
    rows = []
    for bits in (4, 3):
        for method in ("rtn", "gptq", "eaquant"):
            request = Request(method, bits=bits, group_size=32)
            rows.append((f"{method} | W{bits} g32", request, False))
    rows.append(("rtn, mixed | W4 g32, shared/router W8", Request("rtn", mixed=True), False))
    rows.append(("gqsa | W4 g32, 50% groups", Request("gqsa", bits=4, group_sparsity=0.5), False))
    return rows


def _readme_rows() -> list[Row]:
    return [
        (f"readme | 4 experts, top {k}", Request("readme", experts=4, top_k=k), False)
        for k in (2, 4)
    ]


def _layer_error(report: dict) -> float | None:
    errors = [e["layer_error"] for e in report.values() if e.get("layer_error") is not None]
    return float(np.mean(errors)) if errors else None


def _agreement(report: dict) -> float | None:
    value = report.get("mean_agreement")
    return None if value is None else float(value)


def _table(title, workdir, rows, draws, calib_batches, extra, tmp):
    dense = evaluate_workdir(workdir)["bits_per_byte"]
    print(f"\n{title}: dense model of {workdir}: {dense:.4f} bits/byte")
    name, read = extra
    print(f"| method | setting | bits/byte | vs dense | {name} | time |")
    print("|---|---|---|---|---|---|")
    for label, request, drawn in rows:
        bits, seconds, measured = [], [], []
        for draw in range(draws if drawn else 1):
            request = dataclasses.replace(
                request, calib_batches=calib_batches, calib_offset=draw * calib_batches
            )
            out = Path(tmp) / f"{len(list(Path(tmp).iterdir()))}"
            start = time.perf_counter()
            _, report = compress(workdir, out, request)
            seconds.append(time.perf_counter() - start)
            bits.append(evaluate_workdir(out)["bits_per_byte"])
            value = read(report)
            if value is not None:
                measured.append(value)
        relative = 100 * (np.asarray(bits) / dense - 1)
        shown = stats.mean_and_spread(measured, 4) if measured else "-"
        print(
            f"| {label} | {stats.mean_and_spread(bits, 4)} | "
            f"{stats.mean_and_spread(relative, 1)}% | {shown} | {np.mean(seconds):.1f} s |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="a trained MoE run")
    parser.add_argument("--dense_workdir", help="a trained dense run, for Read-ME")
    parser.add_argument("--calib_batches", type=int, default=8)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--sections", default="prune,experts,quantize,readme")
    args = parser.parse_args()
    from moejax.training.restore import read_run

    workdir = Path(args.workdir).absolute()
    sections = args.sections.split(",")
    num_experts = read_run(workdir).model.moe.num_experts
    tables = {
        "prune": ("One-shot pruning", workdir, _prune_rows(), ("layer error", _layer_error)),
        "experts": ("Expert-level", workdir, _expert_rows(num_experts), ("-", lambda r: None)),
        "quantize": ("Quantisation", workdir, _quantize_rows(), ("top-k agreement", _agreement)),
    }
    if args.dense_workdir:
        dense = Path(args.dense_workdir).absolute()
        tables["readme"] = ("Read-ME", dense, _readme_rows(), ("-", lambda r: None))
    with tempfile.TemporaryDirectory() as tmp:
        for section in sections:
            if section in tables:
                title, run, rows, extra = tables[section]
                _table(title, run, rows, args.draws, args.calib_batches, extra, tmp)


if __name__ == "__main__":
    main()
