"""Evaluate a checkpoint: `python eval.py --workdir DIR [--step N] [--config.mesh.expert=4 ...]`.

`python eval.py --hf DIR --text FILE [--window N --stride M]` instead gives the sliding-window
perplexity of a Hugging Face checkpoint (moejax.pretrained) on a local text file, tokenized with
the checkpoint's own tokenizer.json.

`--config.group.field=value` overrides a field of the run's saved config (`--help` lists them);
`--flagfile FILE` reads flags from a file, one per line.

Restores onto whatever devices are present (any mesh shape that fits them), prints and writes
validation loss, bits per byte, perplexity and per-layer routing statistics to
DIR/eval/step_<N>.json. It reads checkpoints without taking the training lock (it may run beside
train.py) and never creates or deletes anything under DIR/checkpoints. A damaged --step N is an
error, not a substitution. Several processes evaluate together as they train together (the
flags of moejax/parallel/distributed.py); process 0 prints and writes. Processes started with
different
flags or code all exit with status 2 before reading anything, naming each flag that differs.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from moejax import cli
from moejax import config as config_lib
from moejax.parallel import distributed
from moejax.training import allocator


def main(argv: list[str]) -> int:
    return cli.report_user_errors(lambda: _main(argv), argv)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="workdir/default", help="a training run directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    parser.add_argument(
        "--sample_bytes",
        type=int,
        default=400,
        help="generate this many bytes from the model (0: none)",
    )
    parser.add_argument("--prompt", default="ROMEO:\n", help="text the sample continues")
    parser.add_argument(
        "--compare_step",
        type=int,
        default=None,
        help="checkpoint to measure routing fluctuation against (default: the one before)",
    )
    parser.add_argument("--hf", default=None, help="a Hugging Face checkpoint directory")
    parser.add_argument("--text", default=None, help="with --hf: the text file to score")
    parser.add_argument(
        "--window", type=int, default=0, help="with --hf: tokens per window (0: max_seq_len)"
    )
    parser.add_argument(
        "--stride", type=int, default=0, help="with --hf: tokens between windows (0: window/2)"
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="with --hf"
    )
    distributed.add_flags(parser)
    cli.add_debug_flag(parser)
    args, overrides = cli.parse(
        parser,
        argv,
        lambda known: (config_lib.Config(), "moejax.config.Config; eval.py overrides the run's"),
    )
    cli.setup_logging()
    if args.hf is not None or args.text is not None:
        return _evaluate_hf(args)
    for flag in ("step", "compare_step", "sample_bytes"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise config_lib.ConfigError(
                f"--{flag}: {getattr(args, flag)} is negative; give a step number >= 0"
            )

    distributed.initialize_from_flags(args)
    # Processes asked for different checkpoints, or running different code, would evaluate
    # together without a collective noticing, and process 0 would report the mixture.
    with distributed.Agreement(
        "start-up",
        remedy="Start every process with the same flags and the same code (checkout or wheel, "
        "and libraries)",
    ) as start:
        flags = ("workdir", "step", "compare_step", "sample_bytes", "prompt")
        given = {f"--{flag}": getattr(args, flag) for flag in flags}
        start.compare("command line", {**given, "--config overrides": overrides})
        start.compare("code", distributed.code_version())
    import jax

    from moejax import plotting
    from moejax.evaluation import evaluate_workdir, routing_table
    from moejax.training.evaluate import expert_load_figure

    results = evaluate_workdir(
        args.workdir,
        step=args.step,
        compare_step=args.compare_step,
        overrides=overrides,
        sample_bytes=args.sample_bytes,
        sample_prompt=args.prompt.encode(),
    )
    if jax.process_index() != 0:
        return 0  # Every process evaluated its share; process 0 reports and writes for all.
    step = results["step"]
    print(f"step {step} on mesh {results['mesh']}")
    print(
        f"validation loss {results['loss']:.4f} nats/byte, {results['bits_per_byte']:.4f} "
        f"bits/byte, perplexity {results['perplexity']:.3f} over {results['tokens']:.0f} bytes"
    )
    print(routing_table(results))
    if results.get("compare_step") is not None:
        print(
            f"fluct.: share of the first validation batch's tokens whose top-1 expert changed "
            f"since step {results['compare_step']}; affinity: share whose expert is the most "
            "likely successor of their previous MoE layer's expert"
        )
    if "moe_flops_halted" in results:
        print(
            f"relative-norm halting: {100 * results['moe_flops_halted']:.1f}% of MoE token "
            "updates skipped (the share of MoE FLOPs a decide-first version would save)"
        )
    densities = {
        name.split("/")[1]: value
        for name, value in results.items()
        if name.startswith("attention/") and name.endswith("/attention_density")
    }
    if densities:
        print(
            "attention density (share of causal key blocks visited): "
            + ", ".join(f"{layer} {float(value):.3f}" for layer, value in densities.items())
        )
    if "sparsity/total" in results:
        print(
            f"pruning: {100 * results['sparsity/total']:.1f}% of all weights are zero "
            f"({100 * results.get('sparsity/prunable', 0.0):.1f}% of the prunable ones)"
        )
    if "sample" in results:
        print(f"--- sample ({args.sample_bytes} bytes after the prompt) ---\n{results['sample']}")
    out_dir = Path(args.workdir) / "eval"
    out_path = out_dir / f"step_{step}.json"
    serialisable = {
        k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v) for k, v in results.items()
    }
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(serialisable, indent=2) + "\n")
    except OSError as error:
        from moejax.training.workdir import WorkdirError

        raise WorkdirError(
            f"--workdir {args.workdir}: cannot write the results to {out_dir} "
            f"({error.strerror or error}); the evaluation above is complete, only the files "
            "were not written"
        ) from None
    print(f"wrote {out_path}")
    figure = expert_load_figure(results, step)
    if figure is not None:
        png_path = out_dir / f"step_{step}_expert_load.png"
        plotting.save_png(figure, png_path)
        print(f"wrote {png_path}")
    return 0


def _evaluate_hf(args: argparse.Namespace) -> int:
    """Sliding-window perplexity of the --hf checkpoint on --text; prints one JSON line too."""
    if args.hf is None or args.text is None:
        raise config_lib.ConfigError("--hf and --text go together: give both")
    text_path = Path(args.text)
    if not text_path.is_file():
        raise config_lib.ConfigError(f"--text: {args.text!r} is not a file")
    from moejax.pretrained import from_hf
    from moejax.pretrained.text import load_tokenizer, sliding_window_perplexity

    tokenizer = load_tokenizer(args.hf)
    model, config = from_hf(args.hf, dtype=args.dtype)
    window = args.window or config.max_seq_len
    if not 1 < window <= config.max_seq_len:
        raise config_lib.ConfigError(
            f"--window: {window}; allowed: 2 .. max_position_embeddings={config.max_seq_len}"
        )
    stride = args.stride or max(1, window // 2)
    token_ids = tokenizer.encode(text_path.read_text(encoding="utf-8")).ids
    result = sliding_window_perplexity(model, np.asarray(token_ids), window=window, stride=stride)
    print(
        f"{args.hf}: perplexity {result['perplexity']:.4f} ({result['nll']:.4f} nats/token) "
        f"over {result['tokens']} tokens of {args.text}, window {window}, stride {stride}"
    )
    print(
        json.dumps({"hf": args.hf, "text": args.text, "window": window, "stride": stride, **result})
    )
    return 0


if __name__ == "__main__":
    # Process-wide, so the program sets it and the library never does; before main()
    # starts JAX's backend (moejax/training/allocator.py says why).
    allocator.tune_malloc()
    sys.exit(main(sys.argv[1:]))
