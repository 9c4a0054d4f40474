"""Train a model: `python train.py [--config FILE.py[:ARG]] [--config.group.field=value ...]`.

Also `--workdir DIR`, and `--flagfile FILE` (flags, one per line). With no arguments it trains
configs/default.py into workdir/default. `--help` lists every config field with its type,
default and meaning.

A config file says what it runs with a module-level `TASK` (one of `TASKS` at the end of this
file): none trains the language model; `TASK = "lottery"` runs the lottery-ticket experiment.

Several processes (a multi-host TPU slice, a SLURM job, or `--coordinator_address HOST:PORT
--num_processes N --process_id I` on each) train one run together: see
moejax/parallel/distributed.py.
Starting again in the same workdir resumes from its newest usable checkpoint. SIGTERM or
SIGINT saves the step in progress, waits for the save, and exits with status 0. One train.py
at a time may use a workdir. Input errors print one paragraph and exit with status 2; so do
processes started with different configs, flags or code, every one of them, before any builds
a model (the line names each field that differs, with every process's value).
"""

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from moejax import cli
from moejax import config as config_lib
from moejax.parallel import distributed
from moejax.training import allocator


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
    parser.add_argument(
        "--init_from_hf",
        default=None,
        help="start from a Hugging Face checkpoint dir: its model config and weights (the "
        "--config overrides apply on top)",
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
    # Every process resolves its config before any of them builds anything: one that differs,
    # or cannot be resolved, stops them all here with a line that names it, where otherwise the
    # first collective would abort in gloo ("512 vs 256") or wait for the heartbeat timeout.
    with distributed.Agreement("start-up", remedy=SAME_EVERYWHERE) as start:
        module = config_lib.load_config_module(args.config.path)
        task = getattr(module, "TASK", LM)
        if task not in TASKS:
            raise config_lib.ConfigError(
                f"--config: {str(args.config.path)!r} declares TASK={task!r}; allowed: "
                f"{sorted(TASKS)} (no TASK: {LM!r})"
            )
        config = TASKS[task].resolve(module, overrides, args)
        start.compare("config", _shared_fields(config))
        start.compare(
            "command line",
            {"--workdir": args.workdir, "--allow_config_change": args.allow_config_change},
        )
        start.compare("code", distributed.code_version())
    return TASKS[task].run(config, args)


SAME_EVERYWHERE = (
    "Start every process with the same config file and --config flags, the same --workdir, "
    "and the same code (checkout or wheel, and libraries)"
)
# Config fields that may differ between processes: where each host finds its copy of the corpus
# is a path on that host (the language model's data.data_dir, the lottery's data_dir). Which
# corpus, and in what order, are other fields, compared like the rest.
PER_HOST_FIELDS = frozenset({"data.data_dir", "data_dir"})


def _shared_fields(config) -> dict:
    """The config's fields by dotted path, less those each host may set for itself."""
    return {
        path: value
        for path, value in distributed.flatten(config).items()
        if path not in PER_HOST_FIELDS
    }


def _lm_config(module, overrides: list[str], args: argparse.Namespace) -> config_lib.Config:
    """The language model's config: the file's, with the --config overrides."""
    config = config_lib.config_of(module, args.config.path, arg=args.config.arg)
    if args.init_from_hf:
        from moejax.pretrained import config_from_hf

        model = config.model
        pretrained, _, _ = config_from_hf(
            args.init_from_hf, dtype=model.dtype, param_dtype=model.param_dtype
        )
        train = dataclasses.replace(config.train, init_from_hf=str(args.init_from_hf))
        data = config.data
        if (Path(args.init_from_hf) / "tokenizer.json").is_file():
            # The checkpoint's own tokens; --config.data.tokenizer= (empty) trains on bytes.
            data = dataclasses.replace(data, tokenizer=str(args.init_from_hf))
        config = dataclasses.replace(config, model=pretrained, train=train, data=data)
    return config_lib.apply_overrides(config, overrides)


def _run_lm(config: config_lib.Config, args: argparse.Namespace) -> int:
    """Trains the language model of `config` in its workdir."""
    from moejax.training.preemption import StopRequest

    # Installed before anything slow: a stop during start-up is honoured at the first step.
    with StopRequest() as stop:
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


def _lottery_config(module, overrides: list[str], args: argparse.Namespace):
    """The lottery-ticket experiment's config (`moejax.tasks.lottery.LotteryConfig`)."""
    from moejax.tasks import lottery

    config = config_lib.config_of(
        module, args.config.path, lottery.LotteryConfig, arg=args.config.arg
    )
    try:
        return lottery.apply_overrides(config, overrides)
    except ValueError as error:
        raise config_lib.ConfigError(str(error)) from None


def _run_lottery(config, args: argparse.Namespace) -> int:
    """The lottery-ticket experiment (`moejax.tasks.lottery`)."""
    from moejax.tasks import lottery

    workdir = Path(args.workdir or Path("workdir") / args.config.name)
    print(config, file=sys.stderr)
    lottery.run_experiment(config, workdir, log=lambda line: print(line, file=sys.stderr))
    print(
        f"results: {workdir / 'results.md'}, {workdir / 'results.json'}, "
        f"{workdir / 'accuracy_vs_weights.png'}"
    )
    return 0


@dataclasses.dataclass(frozen=True)
class Task:
    """A program train.py can start: how it resolves its config from the file and the --config
    overrides (before the processes compare configs), and how it runs with that config."""

    resolve: Callable[[ModuleType, list[str], argparse.Namespace], object]
    run: Callable[[object, argparse.Namespace], int]


LM = "lm"
# What a config file runs, by its module-level TASK: the programs train.py can start.
TASKS = {LM: Task(_lm_config, _run_lm), "lottery": Task(_lottery_config, _run_lottery)}


if __name__ == "__main__":
    # Process-wide, so the program sets it and the library never does; before main()
    # starts JAX's backend (moejax/training/allocator.py says why).
    allocator.tune_malloc()
    sys.exit(main(sys.argv[1:]))
