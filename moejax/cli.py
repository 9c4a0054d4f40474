"""Command-line parsing shared by train.py and eval.py, in the JAX ecosystem's conventions.

`--config path.py[:arg]` picks a config file (its `get_config()`, or `get_config(arg)` given an
argument), `--config.group.field=value` (or `--config.group.field value`) overrides one field,
`--flagfile=PATH` reads more flags from a file, one per line; anything else is an error that lists
the accepted flags. `--help` (or `--helpfull`) also lists every config field with its type, its
default (the config file's value) and the comment written above it in the dataclass.
`report_user_errors` turns every `UserError` into one paragraph on stderr and exit status 2
(`--debug` shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import re
import sys
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

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


def expand_flagfiles(argv: Sequence[str], depth: int = 0) -> list[str]:
    """`argv` with each `--flagfile=PATH` (or `--flagfile PATH`) replaced by the flags in PATH.

    absl's format: one flag per line (`--config.train.steps=100`, `--workdir=runs/a`); blank
    lines and lines starting with `#` or `//` are skipped; a flagfile may name other flagfiles.
    Flags after a `--flagfile` override the file's, as on the command line.
    """
    if depth > 10:
        raise config_lib.ConfigError("--flagfile: nested more than 10 deep (a file names itself?)")
    expanded, args = [], list(argv)
    while args:
        arg = args.pop(0)
        if arg != "--flagfile" and not arg.startswith("--flagfile="):
            expanded.append(arg)
            continue
        if arg == "--flagfile":
            if not args:
                raise config_lib.ConfigError("--flagfile: missing a file name")
            arg = f"--flagfile={args.pop(0)}"
        path = Path(arg.removeprefix("--flagfile="))
        try:
            lines = path.read_text().splitlines()
        except OSError as error:
            raise config_lib.ConfigError(
                f"--flagfile: cannot read {str(path)!r} ({error.strerror or error}); give a "
                "file of flags, one per line"
            ) from None
        flags = [line.strip() for line in lines]
        flags = [f for f in flags if f and not f.startswith(("#", "//"))]
        expanded += expand_flagfiles(flags, depth + 1)
    return expanded


@dataclasses.dataclass(frozen=True)
class ConfigFile:
    """The value of `--config path.py[:arg]`: the file, and the argument of its get_config."""

    path: Path
    arg: str | None = None

    @classmethod
    def parse(cls, text: str) -> ConfigFile:
        path, sep, arg = text.partition(":")
        return cls(Path(path), arg if sep else None)

    @property
    def name(self) -> str:
        """The run's name: the file's stem, and its argument made safe for a directory name."""
        if self.arg is None:
            return self.path.stem
        return f"{self.path.stem}_{re.sub(r'[^A-Za-z0-9._-]+', '_', self.arg)}"

    def __str__(self) -> str:
        return str(self.path) if self.arg is None else f"{self.path}:{self.arg}"


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    """`--config path.py[:arg]`, parsed into a `ConfigFile`."""
    parser.add_argument(
        "--config",
        type=ConfigFile.parse,
        default=ConfigFile.parse(DEFAULT_CONFIG),
        metavar="PATH[:ARG]",
        help="a Python config file; `path.py:arg` builds its get_config(arg) "
        f"(default: {DEFAULT_CONFIG})",
    )


def load_config(config_file: ConfigFile, expected: type = object) -> Any:
    """The config of `--config`: the file's `get_config([arg])`, which must be an `expected`."""
    module = config_lib.load_config_module(config_file.path)
    return config_lib.config_of(module, config_file.path, expected, arg=config_file.arg)


def parse(
    parser: argparse.ArgumentParser,
    argv: Sequence[str],
    help_config: Callable[[argparse.Namespace], tuple[Any, str]] | None = None,
) -> tuple[argparse.Namespace, list[str]]:
    """(namespace, overrides) of `argv` after its flagfiles; argparse errors for unknown flags.

    `help_config(namespace)` gives, for `--help`, the config whose fields to list and where its
    defaults come from; it sees the other flags already parsed (`--config` among them).
    """
    rest, overrides = split_overrides(expand_flagfiles(argv))
    rest = ["--help" if arg == "--helpfull" else arg for arg in rest]
    parser.add_argument(
        "--flagfile",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="more flags from FILE, one `--flag=value` per line (# comments)",
    )
    if help_config is not None and ("--help" in rest or "-h" in rest):
        known, _ = parser.parse_known_args([a for a in rest if a not in ("--help", "-h")])
        add_config_help(parser, *help_config(known))
    return parser.parse_args(rest), overrides


def add_config_help(parser: argparse.ArgumentParser, config: Any, source: str) -> None:
    """Lists every leaf field of `config` in `parser`'s help, a section per group: the flag
    `--config.PATH`, its type, the comment above the field in its dataclass, and its default.
    The entries are for help only: `split_overrides` takes `--config.*` flags before argparse."""
    parser.usage = (
        parser.format_usage().removeprefix("usage: ").strip() + " [--config.PATH=VALUE ...]"
    )
    for path, group in _groups(config, "config"):
        leaves = [
            f
            for f in dataclasses.fields(group)
            if not dataclasses.is_dataclass(getattr(group, f.name))
        ]
        if not leaves:
            continue
        section = parser.add_argument_group(
            f"{path} ({type(group).__name__}; defaults from {source})", _docstring(type(group))
        )
        types, comments = typing.get_type_hints(type(group)), field_help(type(group))
        for f in leaves:
            text = " ".join(
                filter(None, [comments.get(f.name), f"(default: {getattr(group, f.name)!r})"])
            )
            section.add_argument(
                f"--{path}.{f.name}",
                dest=f"help:{path}.{f.name}",
                metavar=type_name(types[f.name]).upper(),
                default=argparse.SUPPRESS,
                help=text.replace("%", "%%"),
            )


def _groups(group: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(dotted path, group) of `group` and every dataclass below it, depth first."""
    yield path, group
    for f in dataclasses.fields(group):
        value = getattr(group, f.name)
        if dataclasses.is_dataclass(value):
            yield from _groups(value, f"{path}.{f.name}")


def type_name(annotation: Any) -> str:
    """`int`, `float`, `str`, `bool`, `int | None`, ... as a reader writes the type."""
    options = typing.get_args(annotation)
    if options:
        return " | ".join("None" if o is type(None) else type_name(o) for o in options)
    return getattr(annotation, "__name__", str(annotation))


def field_help(cls: type) -> dict[str, str]:
    """What the source says about each field of the dataclass `cls` (and of the dataclasses it
    extends): the `#` lines right above the field or the comment after it, else its entry in
    the class docstring (`name: text`, see `_docstring_entries`)."""
    names = {f.name for f in dataclasses.fields(cls)}
    help_of: dict[str, str] = {}
    for owner in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        help_of.update(_docstring_entries(owner, names))
        help_of.update(_comments(owner, names))
    return help_of


def _comments(cls: type, names: set[str]) -> dict[str, str]:
    try:
        lines, _ = inspect.getsourcelines(cls)
    except (OSError, TypeError):
        return {}
    comments, block = {}, []
    for line in lines[1:]:
        text = line.strip()
        if text.startswith("#"):
            block.append(text.removeprefix("#").strip())
            continue
        match = re.match(r"(\w+)\s*:[^#]*(?:#\s*(.*))?$", text)
        if match and match.group(1) in names:
            comment = " ".join(filter(None, [*block, match.group(2)]))
            if comment:
                comments[match.group(1)] = comment
        block = []
    return comments


def _docstring_entries(cls: type, names: set[str]) -> dict[str, str]:
    """`name: text` entries of `cls`'s docstring: each starts a line or follows a sentence
    (`a, b: text` and `a / b: text` describe several fields) and runs to the next entry or the
    end of its paragraph."""
    entries: dict[str, str] = {}
    doc = inspect.cleandoc(cls.__dict__.get("__doc__") or "")
    for paragraph in doc.split("\n\n"):
        text = " ".join(paragraph.split())
        starts = [
            match
            for match in re.finditer(r"(?:^|(?<=\. ))(\w+(?:(?:, | / )\w+)*): ", text)
            if set(re.split(", | / ", match.group(1))) <= names
        ]
        for match, after in zip(starts, [*starts[1:], None], strict=False):
            entry = text[match.end() : after.start() if after else len(text)].strip()
            for name in re.split(", | / ", match.group(1)):
                entries[name] = entry
    return entries


def _docstring(cls: type) -> str | None:
    """The first paragraph of `cls`'s own docstring (not the signature dataclass writes)."""
    doc = cls.__doc__ or ""
    if not doc or doc.startswith(f"{cls.__name__}("):
        return None
    return " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())


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
