"""Train a model: `python train.py [--config configs/NAME.py] [--config.group.field=value ...]
[--workdir DIR]`. With no arguments it trains configs/default.py into workdir/default.

Several processes (a multi-host TPU slice, a SLURM job, or `--coordinator_address HOST:PORT
--num_processes N --process_id I` on each) train one run together: see moejax/distributed.py.
Starting again in the same workdir resumes from its newest usable checkpoint. SIGTERM or
SIGINT saves the step in progress, waits for the save, and exits with status 0. One train.py
at a time may use a workdir. Input errors print one paragraph and exit with status 2.
"""

import argparse
import sys
from pathlib import Path

from moejax import cli, distributed
from moejax import config as config_lib


def main(argv: list[str]) -> int:
    return cli.report_user_errors(lambda: _main(argv), argv)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=cli.DEFAULT_CONFIG, help="a Python config file")
    parser.add_argument(
        "--workdir", default=None, help="run directory (default: workdir/<config name>)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--allow_config_change",
        action="store_true",
        help="resume even though data, batch or optimiser fields differ from the run's",
    )
    distributed.add_flags(parser)
    cli.add_debug_flag(parser)
    args, overrides = cli.parse(parser, argv)
    cli.setup_logging()
    # Before anything asks JAX for devices, and before the stop handlers: with several
    # processes JAX's preemption notifier owns SIGTERM.
    distributed.initialize_from_flags(args)
    experiment = _experiment_config(args.config)
    if experiment is not None:
        return _run_lottery(experiment, overrides, args)

    from moejax.training.preemption import StopRequest

    # Installed before anything slow: a stop during start-up is honoured at the first step.
    with StopRequest() as stop:
        config = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
        workdir = Path(args.workdir or Path("workdir") / Path(args.config).stem)
        # Validate before importing the training stack: bad values fail in milliseconds.
        import jax

        config_lib.validate(config, jax.device_count())
        from moejax.training.loop import NonFiniteLossError, train

        primary = jax.process_index() == 0
        if primary:
            print(config_lib.describe(config), file=sys.stderr)
        try:
            result = train(
                config,
                workdir,
                progress=not args.no_progress,
                allow_config_change=args.allow_config_change,
                stop=stop,
            )
        except NonFiniteLossError as error:
            print(str(error), file=sys.stderr)
            return 1
        # Still under the handlers: a late second signal must not turn a clean stop into -15.
        if not primary:
            return 0
        print(f"finished at step {result.step} in {workdir}")
        if result.last_eval is not None:
            print(
                f"validation: {result.last_eval['bits_per_byte']:.4f} bits/byte "
                f"(loss {result.last_eval['loss']:.4f} nats)"
            )
        print(
            f"checkpoints: {workdir / 'checkpoints'}; metrics: {workdir / 'metrics.jsonl'}; "
            f"TensorBoard: tensorboard --logdir {workdir / 'tensorboard'}"
        )
        return 0


def _experiment_config(path: str):
    """The config of a file whose get_config() returns a non-LM experiment config, else None."""
    import importlib.util

    try:
        spec = importlib.util.spec_from_file_location(f"moejax_config_{Path(path).stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
    except Exception:
        return None  # The LM path loads the file again and reports the problem.
    # Compared by module so that LM runs do not import the pruning stack (jax) this early.
    return config if type(config).__module__ == "moejax.pruning.lottery" else None


def _run_lottery(config, overrides: list[str], args: argparse.Namespace) -> int:
    """The lottery-ticket experiment (moejax.pruning.lottery) instead of LM training."""
    from moejax.pruning import lottery
    from moejax.pruning.lottery_experiment import run_experiment

    try:
        config = lottery.apply_overrides(config, overrides)
    except ValueError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or Path("workdir") / Path(args.config).stem)
    print(config, file=sys.stderr)
    run_experiment(config, workdir, log=lambda line: print(line, file=sys.stderr))
    print(
        f"results: {workdir / 'results.md'}, {workdir / 'results.json'}, "
        f"{workdir / 'accuracy_vs_weights.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
