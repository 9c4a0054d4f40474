"""MQAR recall of the sparse-attention kinds at one training budget.

Trains the small `moejax.tasks` model once per attention kind (dense, sliding window, MoBA at
block sizes 128/64/32/16 with the same routed-token budget, with and without the key
convolution, Routing Transformer, dynamic-mask attention) and writes `results.md` and
`results.json` to `--out` after every run, so a cut-short sweep still leaves its table.

    nice -n 10 python benchmarks/mqar.py --out workdir/mqar [--only "dense +kconv3" ...] [--seed S]
    python benchmarks/mqar.py --out DIR --merge SWEEP_A SWEEP_B   # parallel sweeps, one table
    python benchmarks/mqar.py --out DIR --seeds SEED0 SEED1 SEED2  # mean ± std over seeds

The default task is the "spread" layout (4 pairs scattered over the first 256 of 512 tokens,
16 keys and values, so the pairs span several blocks and block routing matters), trained 800
steps at length 128 then 400 at 512. Without a key convolution even dense attention does not
form the induction head in this budget; "dense +kconv3" is the reference that does.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import numpy as np

from moejax import stats
from moejax.sparse_attention import AttentionConfig
from moejax.tasks.mqar import MQARConfig
from moejax.tasks.mqar_train import MQARTrainConfig, train_mqar


def sweep(routed_tokens: int, window: int, query_block: int) -> dict[str, AttentionConfig]:
    """The compared kinds; every MoBA variant routes `routed_tokens` keys per query block."""
    of = AttentionConfig.of
    runs = {
        "dense": of("dense", block_size=64),
        # The key convolution alone gives a token its predecessor's key, the first half of an
        # induction head; dense with it separates that effect from routing.
        "dense +kconv3": of("dense", block_size=64, key_conv_width=3),
        f"sliding window {window}": of("local", options={"window": window}, block_size=64),
    }
    for block in (128, 64, 32, 16):
        top_k = max(routed_tokens // block, 1)
        for conv in (0, 3):
            name = f"moba b{block} top{top_k}" + (" +kconv3" if conv else "")
            runs[name] = of(
                "moba",
                options={"top_k": top_k, "query_block_size": min(query_block, block)},
                block_size=block,
                key_conv_width=conv,
            )
    runs["routing transformer b16"] = of(
        "routing",
        options={"top_k": routed_tokens // 16, "window": 16, "num_clusters": 4},
        block_size=16,
    )
    runs["routing transformer b16 +kconv3"] = dataclasses.replace(
        runs["routing transformer b16"], key_conv_width=3
    )
    runs["dynamic mask b16"] = of(
        "dynamic_mask", options={"top_k": routed_tokens // 16, "window": 16}, block_size=16
    )
    runs["dynamic mask b16 +kconv3"] = dataclasses.replace(
        runs["dynamic mask b16"], key_conv_width=3
    )
    return runs


def write_tables(out: pathlib.Path, header: dict, rows: list[dict]) -> None:
    (out / "results.json").write_text(json.dumps({"setup": header, "runs": rows}, indent=2))
    lines = [
        f"MQAR: {header}",
        "",
        "| kind | accuracy | routing recall | density | final loss | train s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['accuracy']:.3f} | {r['routing_recall']:.3f} | "
            f"{r['density']:.3f} | {r['loss']:.3f} | {r['train_seconds']:.0f} |"
        )
    (out / "results.md").write_text("\n".join(lines) + "\n")


def merge(out: pathlib.Path, folders: list[pathlib.Path]) -> None:
    """Joins the runs of sweeps that ran in parallel with the same setup (the first run of a
    name wins)."""
    header, rows, seen = None, [], set()
    for folder in folders:
        part = json.loads((folder / "results.json").read_text())
        if header is not None and part["setup"] != header:
            raise ValueError(f"--merge {folder}: setup {part['setup']} differs from {header}")
        header = part["setup"]
        for row in part["runs"]:
            if row["name"] not in seen:
                seen.add(row["name"])
                rows.append(row)
    write_tables(out, header, rows)


def aggregate(out: pathlib.Path, folders: list[pathlib.Path]) -> None:
    """Mean and sample standard deviation (`ddof=1`) over sweeps that differ only in their
    seed: one row per kind run in every folder, in the sweep's order, written to
    `out/seeds.md`."""
    setups, runs = [], []
    for folder in folders:
        part = json.loads((folder / "results.json").read_text())
        setups.append({k: v for k, v in part["setup"].items() if k != "seed"})
        runs.append({row["name"]: row for row in part["runs"]})
    if any(setup != setups[0] for setup in setups):
        raise ValueError(f"--seeds {folders}: the setups differ in more than the seed")
    order = list(sweep(setups[0]["routed_tokens"], 192, setups[0]["query_block"]))
    order += [name for name in runs[0] if name not in order]
    seeds = [json.loads((f / "results.json").read_text())["setup"]["seed"] for f in folders]
    lines = [
        f"MQAR over seeds {seeds} (mean ± sample std, ddof=1): {setups[0]}",
        "",
        "| kind | accuracy | routing recall | density |",
        "|---|---|---|---|",
    ]
    for name in order:
        rows = [r[name] for r in runs if name in r]
        if len(rows) < len(runs):
            continue
        cells = []
        for field in ("accuracy", "routing_recall"):
            cells.append(stats.mean_and_spread([row[field] for row in rows], digits=3))
        cells.append(f"{np.mean([row['density'] for row in rows]):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "seeds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1200, help="total, curriculum included")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--routed-tokens", type=int, default=128)
    parser.add_argument("--window", type=int, default=192)
    parser.add_argument("--query-block", type=int, default=16)
    parser.add_argument("--curriculum-steps", type=int, default=800)
    parser.add_argument("--curriculum-length", type=int, default=128)
    parser.add_argument("--keys", type=int, default=16, help="key and value vocabulary sizes")
    parser.add_argument("--layout", choices=("front", "spread"), default="spread")
    parser.add_argument("--only", nargs="*", help="run only the kinds named so, in this order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument(
        "--merge",
        type=pathlib.Path,
        nargs="+",
        help="only join the results.json of these folders (parallel sweeps) into --out",
    )
    parser.add_argument(
        "--seeds",
        type=pathlib.Path,
        nargs="+",
        help="only write the mean and std over these folders' runs (one seed each) to --out",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        merge(args.out, args.merge)
        return
    if args.seeds:
        aggregate(args.out, args.seeds)
        return
    task = MQARConfig(
        length=args.length,
        num_pairs=args.pairs,
        num_keys=args.keys,
        num_values=args.keys,
        layout=args.layout,
    )
    config = MQARTrainConfig(
        steps=args.steps,
        batch=args.batch,
        learning_rate=args.learning_rate,
        warmup=50,
        curriculum_steps=args.curriculum_steps,
        curriculum_length=args.curriculum_length,
        seed=args.seed,
        log_every=args.log_every,
    )
    header = {
        "length": args.length,
        "pairs": args.pairs,
        "layout": args.layout,
        "keys": args.keys,
        "steps": args.steps,
        "curriculum": f"{args.curriculum_steps} steps at length {args.curriculum_length}",
        "batch": args.batch,
        "lr": args.learning_rate,
        "routed_tokens": args.routed_tokens,
        "query_block": args.query_block,
        "seed": args.seed,
    }
    runs = sweep(args.routed_tokens, args.window, args.query_block)
    names = args.only or list(runs)
    unknown = [name for name in names if name not in runs]
    if unknown:
        raise ValueError(f"--only {unknown}: allowed are {list(runs)}")
    rows = []
    for name in names:
        options = runs[name]
        print(name, flush=True)
        result = train_mqar(task, options, config)
        rows.append({"name": name, **result})
        print(name, {k: v for k, v in result.items() if k != "history"}, flush=True)
        write_tables(args.out, header, rows)


if __name__ == "__main__":
    main()
