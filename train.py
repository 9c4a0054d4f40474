"""Train a model: `python train.py [--config configs/NAME.py] [--config.group.field=value ...]
[--workdir DIR]`. With no arguments it trains configs/default.py into workdir/default.

Starting again in the same workdir resumes from its latest good checkpoint. SIGTERM or
SIGINT saves a checkpoint and exits with status 0.
"""

import argparse
import sys
from pathlib import Path

from moejax import cli
from moejax import config as config_lib


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=cli.DEFAULT_CONFIG, help="a Python config file")
    parser.add_argument(
        "--workdir", default=None, help="run directory (default: workdir/<config name>)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, overrides = cli.parse(parser, argv)
    cli.setup_logging()
    try:
        config = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
        workdir = Path(args.workdir or Path("workdir") / Path(args.config).stem)
        # Validate before importing the training stack: bad values fail in milliseconds.
        import jax

        config_lib.validate(config, jax.device_count())
    except config_lib.ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2

    from moejax.training.loop import NonFiniteLossError, train

    print(config_lib.describe(config), file=sys.stderr)
    try:
        result = train(config, workdir, progress=not args.no_progress)
    except config_lib.ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    except NonFiniteLossError as error:
        print(str(error), file=sys.stderr)
        return 1
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
