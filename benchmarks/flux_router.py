"""Trains Flux attention routers on a dense-trained, frozen language model and checks that they
choose better than coins.

    python benchmarks/flux_router.py --workdir DIR [--kind local] [--window 32]
        [--block_size 32] [--top_k 2] [--target 0.5] [--steps 200] [--budget_weight 1.0]
        [--learning_rate 3e-3] [--train_batches 64] [--eval_batches 0] [--draws 3] [--out FILE]

Restores the latest checkpoint of `DIR` (a run trained with dense attention), builds the same
model with `attention.kind=KIND` and a Flux router in every layer (trained weights copied in,
routers fresh), and reports on the validation batches, in bits/byte:

- every layer full (the model as trained) and every layer sparse (the cheap end);
- the fitted routers (`moejax.training.flux_fit.fit_flux_routers`, model frozen,
  target share `--target` of full attention);
- coins with the routers' own per-layer shares of full attention (`--draws` seeds): the routers
  are worth training only if they beat these at the same cost, which needs them to read the
  content of each sequence;
- coins with the routers' mean share in every layer: what choosing the layers alone is worth.

The share of full attention counts sequences: a layer that picks full attention for a sequence
runs dense attention over it, one that picks sparse runs KIND.
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

import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moejax import config as config_lib  # noqa: E402
from moejax import sparse_attention, stats  # noqa: E402
from moejax.models.transformer import TransformerLM  # noqa: E402
from moejax.sparse_attention.flux import router_param_filter  # noqa: E402
from moejax.training import flux_fit  # noqa: E402
from moejax.training.restore import load_trained, restore_run, run_batches  # noqa: E402

BITS = 1.0 / math.log(2.0)


def routed_model(config: config_lib.Config, variables: dict, args: argparse.Namespace):
    """The run's model with Flux routers between dense attention and `args.kind`."""
    if config.attention.uses_block_kernel:
        raise ValueError(
            f"--workdir: the run used attention.kind={config.attention.kind} "
            f"(flux_router={config.attention.flux_router}, key_conv_width="
            f"{config.attention.key_conv_width}); Flux routes a dense-trained model"
        )
    # --window and --top_k set the options of the kinds that have them.
    option_fields = {f.name for f in dataclasses.fields(sparse_attention.get(args.kind).options)}
    options = {name: getattr(args, name) for name in ("window", "top_k") if name in option_fields}
    attention = dataclasses.replace(
        sparse_attention.AttentionConfig.of(args.kind, options=options),
        block_size=args.block_size,
        impl=config.attention.impl,
        flux_router=True,
        flux_target_full_share=args.target,
    )
    config_lib.validate_attention(attention, config.model, config.data.seq_len)
    model = TransformerLM(config.model, attention=attention, rngs=nnx.Rngs(args.seed))
    load_trained(model, variables, fresh=router_param_filter)
    return model, attention


def bits(evaluated: dict) -> float:
    return float(np.mean(np.asarray(evaluated["nll"]))) * BITS


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    workdir = Path(args.workdir).absolute()
    config, step, variables = restore_run(workdir)
    model, attention = routed_model(config, variables, args)
    layers = len(flux_fit.flux_layers(model))

    # Batches the model saw, in another order.
    train_batches, eval_batches = run_batches(
        config,
        train_batches=args.train_batches,
        eval_batches=args.eval_batches,
        shuffle_offset=1,
    )

    def with_gates(shares, salt=0):
        routers = flux_fit.set_fixed_gates(model, shares, salt=salt)
        try:
            return flux_fit.evaluate_gates(model, eval_batches)
        finally:
            flux_fit.restore_routers(model, routers)

    full = bits(with_gates([1.0] * layers))
    sparse = bits(with_gates([0.0] * layers))
    options = flux_fit.FluxFitOptions(
        steps=args.steps, learning_rate=args.learning_rate, budget_weight=args.budget_weight
    )
    history = flux_fit.fit_flux_routers(model, train_batches, options)
    routed = flux_fit.evaluate_gates(model, eval_batches)
    shares = [float(s) for s in np.asarray(routed["full_share"])]
    coins = [bits(with_gates(shares, salt=1 + draw)) for draw in range(args.draws)]
    mean_share = float(np.mean(shares))
    uniform = [bits(with_gates([mean_share] * layers, salt=1 + draw)) for draw in range(args.draws)]
    return {
        "workdir": str(workdir),
        "step": step,
        "attention": dataclasses.asdict(attention),
        "options": dataclasses.asdict(options),
        "train_batches": len(train_batches),
        "eval_sequences": int(np.asarray(routed["nll"]).shape[0]),
        "full_bits_per_byte": full,
        "sparse_bits_per_byte": sparse,
        "routed_bits_per_byte": bits(routed),
        "routed_full_share": shares,
        "coin_bits_per_byte": coins,
        "uniform_coin_bits_per_byte": uniform,
        "history": history[:: max(len(history) // 20, 1)] + history[-1:],
        "seconds": time.time() - started,
    }


def report(results: dict[str, Any]) -> str:
    a = results["attention"]
    coins = np.asarray(results["coin_bits_per_byte"])
    uniform = np.asarray(results["uniform_coin_bits_per_byte"])
    shares = results["routed_full_share"]
    mean_share = float(np.mean(shares))
    kind = f"{a['kind']} (block {a['block_size']}, window {a['window']}, top-k {a['top_k']})"
    lines = [
        f"Flux routers on {results['workdir']} (step {results['step']}): full attention or "
        f"{kind} per layer and sequence; target full share {a['flux_target_full_share']}, "
        f"{results['options']['steps']} steps on {results['train_batches']} batches, "
        f"{results['eval_sequences']} validation sequences, {results['seconds']:.0f} s.",
        "",
        "| attention | share of full attention | bits/byte |",
        "|---|---:|---:|",
        f"| every layer full | 1.000 | {results['full_bits_per_byte']:.4f} |",
        f"| Flux routers | {mean_share:.3f} | {results['routed_bits_per_byte']:.4f} |",
        f"| coins at the routers' per-layer shares ({len(coins)} draws) | {mean_share:.3f} | "
        f"{stats.mean_and_spread(coins, digits=4)} |",
        f"| coins at the routers' mean share in every layer | {mean_share:.3f} | "
        f"{stats.mean_and_spread(uniform, digits=4)} |",
        f"| every layer sparse | 0.000 | {results['sparse_bits_per_byte']:.4f} |",
        "",
        "Coins: mean ± sample standard deviation (ddof=1) over the draws.",
        "Per-layer share of full attention: " + ", ".join(f"{s:.3f}" for s in shares),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a dense-attention training run")
    parser.add_argument("--kind", default="local", help="the sparse attention kind to route to")
    parser.add_argument("--block_size", type=int, default=32)
    parser.add_argument("--window", type=int, default=32, help="for kinds with a window")
    parser.add_argument("--top_k", type=int, default=2, help="for kinds with a top_k")
    parser.add_argument("--target", type=float, default=0.5, help="target share of full")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--budget_weight", type=float, default=1.0)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--train_batches", type=int, default=64)
    parser.add_argument("--eval_batches", type=int, default=0, help="0: the whole split")
    parser.add_argument("--draws", type=int, default=3, help="coin baselines")
    parser.add_argument("--seed", type=int, default=0, help="router initialisation")
    parser.add_argument("--out", help="markdown report file (raw numbers go to FILE.json)")
    args = parser.parse_args(argv)
    results = run(args)
    text = report(results)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        Path(args.out + ".json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
