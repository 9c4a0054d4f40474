"""Command-line parsing shared by train.py and eval.py.

`--config PATH` picks a config file, `--config.group.field=value` overrides one field;
anything else is an error that lists the accepted flags. `report_user_errors` turns every
`UserError` into one paragraph on stderr and exit status 2 (`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from moejax import config as config_lib
from moejax.errors import UserError

DEFAULT_CONFIG = "configs/default.py"


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.a.b=v` (or `--config.a.b v`) overrides from the other flags."""
    rest, overrides = [], []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--config."):
            body = arg.removeprefix("--config.")
            if "=" not in body:
                if not args:
                    raise config_lib.ConfigError(f"{arg}: missing a value")
                body = f"{body}={args.pop(0)}"
            overrides.append(body)
        else:
            rest.append(arg)
    return rest, overrides


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def parse(parser: argparse.ArgumentParser, argv: Sequence[str]):
    """(namespace, overrides); argparse errors for unknown flags."""
    rest, overrides = split_overrides(argv)
    return parser.parse_args(rest), overrides


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an input error too"
    )


def report_user_errors(body: Callable[[], int], argv: Sequence[str]) -> int:
    """Runs `body`; a `UserError` becomes its message on stderr and exit status 2, unless
    `--debug` is in `argv` (then it propagates with its traceback)."""
    try:
        return body()
    except UserError as error:
        if "--debug" in argv:
            raise
        print(f"{error.label}: {error}", file=sys.stderr)
        return 2
