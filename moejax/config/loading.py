"""Config files, command-line overrides (`group.field=value`) and JSON round trips."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import traceback
import typing
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from moejax.config.groups import Config, ConfigError


def load_config_module(path: str | Path) -> ModuleType:
    """Imports a Python config file; the module defines `get_config()` and may declare
    `TASK`, the program it configures (`train.py` runs the language model when it is absent)."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(f"--config: {str(path)!r} {what}; give a Python config file")
    spec = importlib.util.spec_from_file_location(f"moejax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        raise ConfigError(
            f"--config: {str(path)!r} line {error.lineno}: {error.msg}; the file must be valid "
            "Python defining get_config()"
        ) from None
    except Exception as error:  # noqa: BLE001 - whatever the file raises, the user must see it
        raise ConfigError(
            f"--config: importing {str(path)!r} raised {_raised_at(error, path)}"
        ) from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config: {str(path)!r} defines no get_config() function")
    return module


def config_of(module: ModuleType, path: str | Path, expected: type = Config) -> Any:
    """`module.get_config()` (`module` loaded from `path` by `load_config_module`), which must
    return an instance of `expected`."""
    path = Path(path)
    try:
        config = module.get_config()
    except Exception as error:  # noqa: BLE001
        raise ConfigError(
            f"--config: get_config() in {str(path)!r} raised {_raised_at(error, path)}"
        ) from None
    if not isinstance(config, expected):
        raise ConfigError(
            f"--config: get_config() in {str(path)!r} returned {type(config)}; the file's task "
            f"runs on a {expected.__name__}"
        )
    return config


def load_config_file(path: str | Path) -> Config:
    """Imports a Python config file and returns its `get_config()`, a language-model `Config`."""
    return config_of(load_config_module(path), path)


def _raised_at(error: BaseException, path: Path) -> str:
    """`Type: message (line N)`, N the deepest line of `path` in the error's traceback."""
    lines = [
        frame.lineno
        for frame in traceback.extract_tb(error.__traceback__)
        if Path(frame.filename).resolve() == path.resolve()
    ]
    where = f" (line {lines[-1]})" if lines else ""
    return f"{type(error).__name__}: {error}{where}"


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse_value(field: str, text: str, annotation: Any) -> Any:
    if annotation is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{field}: value {text!r} is not a boolean; allowed: true, false")
    if annotation in (int, float):
        try:
            value = annotation(text) if annotation is float else int(text, 0)
        except ValueError:
            raise ConfigError(
                f"{field}: value {text!r} is not a valid {annotation.__name__}"
            ) from None
        return value
    if annotation is str:
        return text
    optional = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(optional) == 1 and len(typing.get_args(annotation)) == 2:
        return None if text.strip().lower() == "none" else _parse_value(field, text, optional[0])
    raise ConfigError(f"{field}: cannot be set from the command line (type {annotation})")


def apply_overrides(config: Config, overrides: Iterable[str]) -> Config:
    """Returns `config` with `group.field=value` overrides applied, values parsed by field type.

    Each group is rebuilt once with all its overrides (a later override of a field wins), so
    groups that check combinations of fields (`pruning`) accept the overrides in any order.
    """
    changes: dict[str, dict[str, Any]] = {}
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r}: expected the form group.field=value")
        dotted, text = override.split("=", 1)
        parts = dotted.split(".")
        groups = {f.name: f for f in dataclasses.fields(Config)}
        if len(parts) != 2 or parts[0] not in groups:
            raise ConfigError(
                f"config: unknown field {dotted!r}; fields are group.name with group one of "
                f"{', '.join(groups)}"
            )
        group_name, name = parts
        types_of = _field_types(type(getattr(config, group_name)))
        if name not in types_of:
            raise ConfigError(
                f"config: unknown field {dotted!r}; allowed fields of {group_name}: "
                f"{', '.join(types_of)}"
            )
        changes.setdefault(group_name, {})[name] = _parse_value(dotted, text, types_of[name])
    rebuilt = {
        name: _build(getattr(config, name), name, **fields) for name, fields in changes.items()
    }
    return dataclasses.replace(config, **rebuilt)


def _build(group: Any, group_name: str, **fields: Any) -> Any:
    """`dataclasses.replace(group, **fields)`; a group that checks itself on construction
    (`pruning`, `attention`) raises ValueError, reported as the ConfigError every bad value
    gives, with the group's name in front when the message lacks it."""
    try:
        return dataclasses.replace(group, **fields)
    except ConfigError:
        raise
    except ValueError as error:
        message = str(error)
        if not message.startswith(f"{group_name}."):
            message = f"{group_name}.{message}"
        raise ConfigError(message) from None


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(config)


def from_dict(data: dict[str, dict[str, Any]]) -> Config:
    """Inverse of `to_dict`; fields unknown to this version are an error, missing ones default."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected an object of groups, got {type(data).__name__}")
    groups = {}
    for f in dataclasses.fields(Config):
        cls = _field_types(Config)[f.name]
        values = data.get(f.name, {})
        if not isinstance(values, dict):
            raise ConfigError(
                f"config: group {f.name!r} must be an object of fields, got {values!r:.80}"
            )
        types_of = _field_types(cls)
        unknown = set(values) - set(types_of)
        if unknown:
            raise ConfigError(f"config: unknown fields {sorted(unknown)} in group {f.name!r}")
        values = {
            name: _typed_json_value(f"{f.name}.{name}", value, types_of[name])
            for name, value in values.items()
        }
        groups[f.name] = _build(cls(), f.name, **values)
    return Config(**groups)


def _typed_json_value(field: str, value: Any, annotation: Any) -> Any:
    """`value` read from JSON for a field of type `annotation`; the wrong type is a ConfigError
    (JSON has one number type, so an integer is a valid float)."""
    options = typing.get_args(annotation) or (annotation,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is bool and isinstance(value, bool):
            return value
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is str and isinstance(value, str):
            return value
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ConfigError(f"{field}: value {value!r:.80} is not of type {names}")


def to_json(config: Config) -> str:
    """The text of a `config.json` (what `load_json` reads back)."""
    return json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n"


def save_json(config: Config, path: str | Path) -> None:
    Path(path).write_text(to_json(config))


def load_json(path: str | Path) -> Config:
    return from_dict(json.loads(Path(path).read_text()))
