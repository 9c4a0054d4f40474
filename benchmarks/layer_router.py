"""Fits Dr.LLM layer routers on a trained run's frozen LM and measures what they save and cost.

    python benchmarks/layer_router.py --workdir DIR [--steps N] [--penalty P [P ...]]
        [--out FILE] [--train_batches B] [--eval_batches B] [--router_dim H]
        [--focal_gamma G] [--class_weighting balanced|none] [--learning_rate LR]

Restores the latest checkpoint of `DIR` (config.json + checkpoints/), builds the same model with
`layer_router_dim=H` (trained weights copied in, routers fresh), and on `--train_batches`
training batches measures every layer's skip / execute / repeat losses
(`moejax.training.fit_layer_router.option_losses`). For each compute penalty it labels every layer
greedily (per-layer proxy of Dr.LLM's tree search), fits fresh routers to the labels with the
LM frozen, and reports on the validation batches:

- bits/byte with every layer executing, routed (each router's argmax, as `TransformerLM` does at
  evaluation), and following the oracle labels of the validation sequences;
- block applications per sequence (skip 0, execute 1, repeat 2; num_layers when all execute).
  `routed_block` still computes every option for the whole batch, so this counts decisions; the
  saving needs sequences grouped by decision;
- router accuracy against the labels (train and validation, on the all-execute path the labels
  were measured on) next to the accuracy of always predicting the layer's most frequent label;
- per layer: the shares of skip / execute / repeat among the labels and the routed decisions.

The markdown report goes to stdout and to `--out` (with the raw numbers in `--out`.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moejax import config as config_lib  # noqa: E402
from moejax import depth, stats  # noqa: E402
from moejax.models.transformer import TransformerLM  # noqa: E402
from moejax.training import fit_layer_router as fit  # noqa: E402
from moejax.training.restore import load_trained, restore_run, run_batches  # noqa: E402

BITS = 1.0 / math.log(2.0)


def routed_model(
    config: config_lib.Config, variables: dict[str, Any], router_dim: int, seed: int
) -> TransformerLM:
    """The run's model with fresh layer routers of width `router_dim` and its trained weights."""
    model_config = dataclasses.replace(
        config.model, depth=dataclasses.replace(config.model.depth, layer_router_dim=router_dim)
    )
    model = TransformerLM(model_config, rngs=nnx.Rngs(seed))
    load_trained(model, variables, fresh=fit.ROUTER_PARAMS)
    return model


def compiled(model: TransformerLM):
    """Jitted passes over the model's current state (passed in, so refitted routers apply)."""
    graphdef = nnx.graphdef(model)

    def labelling(state, tokens, targets):
        m = nnx.merge(graphdef, state)
        return fit.option_losses(m, tokens, targets), fit.router_inputs(m, tokens)

    def decided(state, tokens, targets, decisions):
        logits, _ = nnx.merge(graphdef, state)(tokens, train=False, layer_decisions=decisions)
        return fit.sequence_losses(logits, targets)

    def routed(state, tokens, targets):
        logits, aux = nnx.merge(graphdef, state)(tokens, train=False)
        shares = jnp.stack(
            [
                jnp.stack([layer[f"layer_{name}_fraction"] for name in depth.LAYER_DECISIONS])
                for layer in aux
            ]
        )  # [num_layers, 3]
        return fit.sequence_losses(logits, targets), shares

    return jax.jit(labelling), jax.jit(decided), jax.jit(routed)


def _shares(decisions: np.ndarray) -> np.ndarray:
    """`[num_layers, sequences]` decisions -> `[num_layers, 3]` share of each action."""
    return np.stack([(decisions == i).mean(axis=1) for i in range(len(depth.LAYER_DECISIONS))], 1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    workdir = Path(args.workdir).absolute()
    config, step, variables = restore_run(workdir)
    model = routed_model(config, variables, args.router_dim, args.seed)
    num_layers = config.model.num_layers
    labelling, decided, routed = compiled(model)

    train_batches, eval_batches = run_batches(
        config,
        train_batches=args.train_batches,
        eval_batches=args.eval_batches or config.data.eval_batches,
    )

    def label_data(batches):
        state = nnx.state(model)
        outs = [labelling(state, b["inputs"], b["targets"]) for b in batches]
        losses = jnp.concatenate([o[0] for o in outs], axis=1)  # [layers, sequences, 3]
        inputs = jnp.concatenate([o[1] for o in outs], axis=1)  # [layers, sequences, 1, d]
        return losses, inputs

    train_losses, train_inputs = label_data(train_batches)
    eval_losses, eval_inputs = label_data(eval_batches)
    labelled = time.time()
    fresh_routers = fit.get_router_params(model)
    options = fit.FitOptions(
        steps=args.steps,
        learning_rate=args.learning_rate,
        focal_gamma=args.focal_gamma,
        class_weighting=args.class_weighting,
    )
    execute_bpb = float(jnp.mean(eval_losses[0, :, depth.EXECUTE])) * BITS
    results: dict[str, Any] = {
        "workdir": str(workdir),
        "step": step,
        "num_layers": num_layers,
        "train_sequences": int(train_losses.shape[1]),
        "eval_sequences": int(eval_losses.shape[1]),
        "options": dataclasses.asdict(options),
        "router_dim": args.router_dim,
        "blind_draws": args.blind_draws,
        "execute_bits_per_byte": execute_bpb,
        # Mean over validation sequences of each single-layer option, bits/byte.
        "option_bits_per_byte": (np.asarray(jnp.mean(eval_losses, axis=1)) * BITS).tolist(),
        "penalties": [],
    }
    batch = config.data.eval_batch_size
    for penalty in args.penalty:
        train_labels = fit.layer_labels(train_losses, compute_penalty=penalty)
        eval_labels = np.asarray(fit.layer_labels(eval_losses, compute_penalty=penalty))
        fit.set_router_params(model, fresh_routers)
        fitted = fit.fit_layer_routers(model, train_inputs, train_labels, options)
        state = nnx.state(model)

        def decided_bits(decisions: np.ndarray, state=state) -> float:
            """Validation bits/byte under `decisions [layers, sequences]`."""
            losses = [
                decided(
                    state,
                    b["inputs"],
                    b["targets"],
                    jnp.asarray(decisions[:, i * batch : (i + 1) * batch]),
                )
                for i, b in enumerate(eval_batches)
            ]
            return float(np.mean(np.concatenate(losses))) * BITS

        routed_losses, routed_shares = [], []
        for b in eval_batches:
            losses, shares = routed(state, b["inputs"], b["targets"])
            routed_losses.append(losses)
            routed_shares.append(shares)
        routed_share = np.mean(np.stack(routed_shares), axis=0)  # [layers, 3]
        # Input-blind decisions at the routed compute: what the routers' choice of sequences
        # is worth beyond how often they skip or repeat.
        rng = np.random.default_rng(args.seed)
        blind_bits, blind_blocks = [], []
        for _ in range(args.blind_draws):
            blind = np.stack(
                [rng.choice(3, size=eval_labels.shape[1], p=p / p.sum()) for p in routed_share]
            ).astype(np.int32)  # [layers, sequences]
            blind_bits.append(decided_bits(blind))
            blind_blocks.append(float(np.mean(np.asarray(fit.block_applications(blind)))))
        label_share = _shares(eval_labels)
        eval_accuracy = fit.router_accuracy(fit.get_router_params(model), eval_inputs, eval_labels)
        results["penalties"].append(
            {
                "penalty": penalty,
                "oracle_bits_per_byte": decided_bits(eval_labels),
                "routed_bits_per_byte": float(np.mean(np.concatenate(routed_losses))) * BITS,
                "blind_bits_per_byte": float(np.mean(blind_bits)),
                "blind_bits_per_byte_std": stats.sample_std(blind_bits),
                "blind_blocks": float(np.mean(blind_blocks)),
                "oracle_blocks": float(np.mean(np.asarray(fit.block_applications(eval_labels)))),
                "routed_blocks": float(np.sum(routed_share * np.arange(3))),
                "label_share": label_share.tolist(),
                "routed_share": routed_share.tolist(),
                "train_accuracy": np.asarray(fitted.accuracy_after).tolist(),
                "eval_accuracy": np.asarray(eval_accuracy).tolist(),
                "majority_accuracy": label_share.max(axis=1).tolist(),
                "fit_loss": [float(fitted.losses[0]), float(fitted.losses[-1])],
            }
        )
    results["seconds"] = {"labelling": labelled - started, "total": time.time() - started}
    return results


def _triple(values: list[float]) -> str:
    return "/".join(f"{100 * v:.0f}" for v in values)


def markdown(results: dict[str, Any]) -> str:
    n = results["num_layers"]
    o = results["options"]
    lines = [
        f"## Dr.LLM layer routers on `{results['workdir']}` (step {results['step']})",
        "",
        f"{n} layers; labels from {results['train_sequences']} training sequences, measured on "
        f"{results['eval_sequences']} validation sequences. Router width "
        f"{results['router_dim']}, {o['steps']} full-batch AdamW steps at lr "
        f"{o['learning_rate']}, focal gamma {o['focal_gamma']}, class weighting "
        f"{o['class_weighting']} (cap {o['max_class_weight']}). Labels: per-layer greedy "
        "argmin of loss + penalty x block applications (proxy of the paper's MCTS).",
        "",
        "Single-layer options (validation bits/byte when only that layer deviates):",
        "",
        "| layer | skip | execute | repeat |",
        "|---|---|---|---|",
    ]
    for layer, (skip, execute, repeat) in enumerate(results["option_bits_per_byte"]):
        lines.append(f"| {layer} | {skip:.4f} | {execute:.4f} | {repeat:.4f} |")
    lines += [
        "",
        f"All layers executing: {results['execute_bits_per_byte']:.4f} bits/byte, {n} blocks.",
        "",
        "| penalty (nats/block) | routed bits/byte | routed blocks/seq | blind bits/byte | "
        "blind blocks/seq | oracle bits/byte | oracle blocks/seq | router acc. train | "
        "router acc. val | majority-label acc. val |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["penalties"]:
        mean = lambda key, row=row: 100 * float(np.mean(row[key]))
        blind = stats.format_spread(row["blind_bits_per_byte"], row["blind_bits_per_byte_std"], 4)
        lines.append(
            f"| {row['penalty']:g} | {row['routed_bits_per_byte']:.4f} | "
            f"{row['routed_blocks']:.2f} | {blind} | "
            f"{row['blind_blocks']:.2f} | {row['oracle_bits_per_byte']:.4f} | "
            f"{row['oracle_blocks']:.2f} | {mean('train_accuracy'):.1f}% | "
            f"{mean('eval_accuracy'):.1f}% | {mean('majority_accuracy'):.1f}% |"
        )
    lines += [
        "",
        "routed: each router's argmax on the stream its predecessors produced; blind: random "
        "decisions drawn per sequence with the routed shares of each layer (same expected "
        f"compute, blind to the input; mean ± sample std, ddof=1, over {results['blind_draws']} "
        "draws); "
        "oracle: every layer follows its own greedy label.",
        "",
        "Per layer, validation: skip/execute/repeat shares in % of the oracle labels and of the "
        "routed decisions, and router accuracy against the labels.",
        "",
        "| penalty | layer | labels s/e/r % | routed s/e/r % | router acc. val |",
        "|---|---|---|---|---|",
    ]
    for row in results["penalties"]:
        for layer in range(n):
            lines.append(
                f"| {row['penalty']:g} | {layer} | {_triple(row['label_share'][layer])} | "
                f"{_triple(row['routed_share'][layer])} | "
                f"{100 * row['eval_accuracy'][layer]:.1f}% |"
            )
    seconds = results["seconds"]
    lines += [
        "",
        f"Labelling took {seconds['labelling']:.0f} s, everything {seconds['total']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a training run (config.json + ckpts)")
    parser.add_argument("--steps", type=int, default=500, help="router fitting steps")
    parser.add_argument(
        "--penalty",
        type=float,
        nargs="+",
        default=[0.0, 0.05, 0.1, 0.2, 0.3],
        help="compute penalties (nats per block application), one row each",
    )
    parser.add_argument("--out", help="markdown report file (raw numbers go to FILE.json)")
    parser.add_argument("--train_batches", type=int, default=32, help="batches to label")
    parser.add_argument(
        "--eval_batches", type=int, default=0, help="validation batches; 0: the run's config"
    )
    parser.add_argument("--router_dim", type=int, default=64, help="router bottleneck width")
    parser.add_argument("--focal_gamma", type=float, default=2.0)
    parser.add_argument("--class_weighting", default="balanced", choices=fit.CLASS_WEIGHTINGS)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0, help="router initialisation, blind draws")
    parser.add_argument(
        "--blind_draws", type=int, default=5, help="draws of the input-blind baseline"
    )
    args = parser.parse_args(argv)
    for name in ("steps", "train_batches", "router_dim", "blind_draws"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: got {getattr(args, name)!r}; allowed: an integer >= 1")
    if args.eval_batches < 0:
        parser.error(f"--eval_batches: got {args.eval_batches!r}; allowed: >= 0")
    if min(args.penalty) < 0:
        parser.error(f"--penalty: got {args.penalty!r}; allowed: values >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = run(args)
    report = markdown(results)
    print(report)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        out.with_suffix(out.suffix + ".json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
