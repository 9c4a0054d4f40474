"""Train a model: `python train.py [--config FILE.py[:ARG]] [--config.group.field=value ...]`.

Also `--workdir DIR`, and `--flagfile FILE` (flags, one per line). With no arguments it trains
configs/default.py into workdir/default. `--help` lists every config field with its type,
default and meaning.

A config file says what it runs with a module-level `TASK` (one of `TASKS` at the end of this
file): none trains the language model; `TASK = "lottery"` runs the lottery-ticket experiment.

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
    cli.add_config_flag(parser)
    parser.add_argument(
        "--workdir", default=None, help="run directory (default: workdir/<config name>[_ARG])"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--allow_config_change",
        action="store_true",
        help="resume even though data, batch or optimiser fields differ from the run's",
    )
    distributed.add_flags(parser)
    cli.add_debug_flag(parser)
    args, overrides = cli.parse(
        parser, argv, lambda known: (cli.load_config(known.config), str(known.config))
    )
    cli.setup_logging()
    # Before anything asks JAX for devices, and before the stop handlers: with several
    # processes JAX's preemption notifier owns SIGTERM.
    distributed.initialize_from_flags(args)
    module = config_lib.load_config_module(args.config.path)
    task = getattr(module, "TASK", LM)
    if task not in TASKS:
        raise config_lib.ConfigError(
            f"--config: {str(args.config.path)!r} declares TASK={task!r}; allowed: {sorted(TASKS)} "
            f"(no TASK: {LM!r})"
        )
    return TASKS[task](module, overrides, args)


def _run_lm(module, overrides: list[str], args: argparse.Namespace) -> int:
    """Trains the language model of `moejax.config.Config` in its workdir."""
    from moejax.training.preemption import StopRequest

    # Installed before anything slow: a stop during start-up is honoured at the first step.
    with StopRequest() as stop:
        config = config_lib.config_of(module, args.config.path, arg=args.config.arg)
        config = config_lib.apply_overrides(config, overrides)
        workdir = Path(args.workdir or Path("workdir") / args.config.name)
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


def _run_lottery(module, overrides: list[str], args: argparse.Namespace) -> int:
    """The lottery-ticket experiment (`moejax.tasks.lottery`)."""
    from moejax.tasks import lottery

    config = config_lib.config_of(
        module, args.config.path, lottery.LotteryConfig, arg=args.config.arg
    )
    try:
        config = lottery.apply_overrides(config, overrides)
    except ValueError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir or Path("workdir") / args.config.name)
    print(config, file=sys.stderr)
    lottery.run_experiment(config, workdir, log=lambda line: print(line, file=sys.stderr))
    print(
        f"results: {workdir / 'results.md'}, {workdir / 'results.json'}, "
        f"{workdir / 'accuracy_vs_weights.png'}"
    )
    return 0


LM = "lm"
# What a config file runs, by its module-level TASK: the programs train.py can start.
TASKS = {LM: _run_lm, "lottery": _run_lottery}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
