"""Config files, command-line overrides (`group.field=value`) and JSON round trips."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import traceback
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from moejax import moe
from moejax.config.groups import Config
from moejax.config.model import DispatchConfig, RouterConfig
from moejax.errors import ConfigError
from moejax.sparse_attention.base import KINDS as ATTENTION_KINDS


def load_config_module(path: str | Path) -> ModuleType:
    """Imports a Python config file; the module defines `get_config()` (or `get_config(arg)`,
    for `--config path.py:arg`) and may declare `TASK`, the program it configures (`train.py`
    runs the language model when it is absent)."""
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


def config_of(
    module: ModuleType, path: str | Path, expected: type = Config, arg: str | None = None
) -> Any:
    """`module.get_config()`, or `module.get_config(arg)` when `arg` is given (`--config
    path.py:arg`, as ml_collections' config files take it), which must return an instance of
    `expected`; `module` was loaded from `path` by `load_config_module`."""
    path = Path(path)
    call = "get_config()" if arg is None else f"get_config({arg!r})"
    try:
        config = module.get_config() if arg is None else module.get_config(arg)
    except Exception as error:  # noqa: BLE001
        raise ConfigError(
            f"--config: {call} in {str(path)!r} raised {_raised_at(error, path)}"
        ) from None
    if not isinstance(config, expected):
        raise ConfigError(
            f"--config: {call} in {str(path)!r} returned {type(config)}; the file's task "
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
    if typing.get_origin(annotation) is tuple:
        # "0,1,2" (or "" for none): a tuple of the element type.
        (element, _) = typing.get_args(annotation)
        parts = [part.strip() for part in text.split(",") if part.strip()]
        return tuple(_parse_value(field, part, element) for part in parts)
    if annotation is str:
        return text
    optional = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(optional) == 1 and len(typing.get_args(annotation)) == 2:
        return None if text.strip().lower() == "none" else _parse_value(field, text, optional[0])
    raise ConfigError(f"{field}: cannot be set from the command line (type {annotation})")


def apply_overrides(config: Config, overrides: Iterable[str]) -> Config:
    """Returns `config` with `group.field=value` overrides applied, values parsed by field type.

    A field of a subgroup has a longer path: `model.moe.num_experts=8`,
    `model.router.options.top_p=0.5`. Each group is rebuilt once with all its overrides (a later
    override of a field wins), so groups that check combinations of fields accept the overrides
    in any order; setting `model.router.name` starts the router's options from the new router's
    defaults before its `model.router.options.*` overrides apply.
    """
    changes: dict[str, Any] = {}
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r}: expected the form group.field=value")
        dotted, text = override.split("=", 1)
        *groups, name = dotted.split(".")
        node = changes
        for depth, part in enumerate(groups):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"config: {'.'.join(groups[: depth + 1])!r} is set as a value and as a group"
                )
        if isinstance(node.get(name), dict):
            raise ConfigError(f"config: {dotted!r} is set as a value and as a group")
        node[name] = text
    return _rebuild(config, changes, "", _parse_value)


def with_fields(group: Any, changes: dict[str, Any]) -> Any:
    """`group` (a `Config` or any group) with the fields at the dotted paths of `changes`, given
    relative to it and already typed: `with_fields(model, {"moe.top_k": 1, "router.name":
    "top_p", "router.options.top_p": 0.5})`. Rebuilt as `apply_overrides` rebuilds, so every
    group checks itself once with all its changes."""
    nested: dict[str, Any] = {}
    for dotted, value in changes.items():
        *groups, name = dotted.split(".")
        node = nested
        for part in groups:
            node = node.setdefault(part, {})
        node[name] = value
    return _rebuild(group, nested, "", lambda field, value, annotation: value)


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """`config` as nested dicts of plain values (what `config.json` holds)."""
    return dataclasses.asdict(config)


def flat_fields(config: Any) -> dict[str, Any]:
    """Every leaf field of `config` (a `Config` or any group) by its dotted path:
    `{"model.moe.top_k": 2, "model.router.options.renormalize": True, ...}`."""
    flat = {}

    def walk(path: str, group: Any) -> None:
        for f in dataclasses.fields(group):
            value = getattr(group, f.name)
            name = ".".join(filter(None, [path, f.name]))
            if dataclasses.is_dataclass(value):
                walk(name, value)
            else:
                flat[name] = value

    walk("", config)
    return flat


def from_dict(data: dict[str, Any]) -> Config:
    """Inverse of `to_dict`; fields unknown to this version are an error, missing ones default.

    A `model` group written before the model was split into subgroups (flat fields such as
    `num_experts`, `router` a name), a `model.moe` group written before the dispatch options
    were nested (`model.moe.capacity_factor`, ...), and an `attention` group written before each
    kind got its own options (flat `top_k`, `window`) are read as the same config in today's
    layout.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected an object of groups, got {type(data).__name__}")
    if isinstance(data.get("model"), dict) and _is_flat_model(data["model"]):
        data = {**data, "model": _nest_flat_model(data["model"])}
    if isinstance(data.get("model"), dict) and isinstance(data["model"].get("moe"), dict):
        data = {**data, "model": {**data["model"], "moe": _nest_dispatch(data["model"]["moe"])}}
    if isinstance(data.get("attention"), dict) and "options" not in data["attention"]:
        data = {**data, "attention": _nest_flat_attention(data["attention"])}
    return _rebuild(Config(), data, "", _typed_json_value)


# LLEP was `expert_balance="llep"` of the dropless strategies before it was a strategy.
_BALANCED_STRATEGY = {("dropless", "llep"): "llep", ("expert_parallel", "llep"): "llep"}


def _nest_dispatch(moe_group: dict[str, Any]) -> dict[str, Any]:
    """A `model.moe` group written before each strategy's options were nested under its name
    (`dispatch` a name, `capacity_factor`, `gmm_impl`, ... beside it) in today's layout. Options
    the named strategy does not have are dropped: they did nothing."""
    old = {name: moe_group[name] for name in moe_group if name in _DISPATCH_FIELDS}
    if not old and not isinstance(moe_group.get("dispatch"), str):
        return moe_group
    nested = {name: value for name, value in moe_group.items() if name not in old}
    name = nested.pop("dispatch", DispatchConfig().name)
    name = _BALANCED_STRATEGY.get((name, old.pop("expert_balance", None)), name)
    spec = moe.DISPATCHES.get(name)
    fields = {f.name for f in dataclasses.fields(spec.options)} if spec else set()
    options = {
        _DISPATCH_OPTIONS[field]: value
        for field, value in old.items()
        if _DISPATCH_OPTIONS[field] in fields
    }
    return {**nested, "dispatch": {"name": name, "options": options}}


def _rebuild(group: Any, changes: dict[str, Any], path: str, parse: Callable) -> Any:
    """`group` with `changes` applied: a value per field, or a dict of changes per subgroup.

    `parse(field_path, raw, annotation)` turns a raw value (command-line text or a JSON value)
    into the field's type. A group class may declare `resets = {trigger: dependent}`: when the
    trigger field changes, the dependent subgroup starts from its default for the new value.
    """
    where = path or "config"
    if not isinstance(changes, dict):
        raise ConfigError(f"{where}: expected an object of fields, got {changes!r:.80}")
    types_of = typing.get_type_hints(type(group))
    fields = [f.name for f in dataclasses.fields(group)]
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        moved = _MOVED_FIELDS.get(path, {}).get(unknown[0])
        hint = f" (it is {path}.{'.'.join(moved)} now)" if moved else ""
        if path == "attention" and unknown[0] in _FLAT_ATTENTION_OPTIONS:
            hint = _flat_attention_hint(unknown[0])
        if path == "model.moe" and unknown[0] in _DISPATCH_FIELDS:
            hint = f" ({_DISPATCH_FIELDS[unknown[0]]})"
        leaf, change = [path, unknown[0]], changes[unknown[0]]
        while isinstance(change, dict) and change:  # name the whole path the user wrote
            leaf.append(next(iter(change)))
            change = change[leaf[-1]]
        raise ConfigError(
            f"{where}: unknown field {'.'.join(filter(None, leaf))!r}{hint}; "
            f"allowed fields of {where} ({type(group).__name__}): {', '.join(fields)}"
        )
    values, bases = {}, {}
    for name, change in changes.items():
        field = ".".join(filter(None, [path, name]))
        is_group = dataclasses.is_dataclass(getattr(group, name))
        if is_group or isinstance(change, dict):
            if not (is_group and isinstance(change, dict)):
                what = "a group: set its fields as" if is_group else "a value, not a group:"
                raise ConfigError(f"config: {field!r} is {what} {field}.<field>=...")
            bases[name] = getattr(group, name)
        else:
            values[name] = parse(field, change, types_of[name])
    for trigger, dependent in getattr(type(group), "resets", {}).items():
        if trigger in values and values[trigger] != getattr(group, trigger):
            fresh = dataclasses.replace(group, **{trigger: values[trigger], dependent: None})
            bases[dependent] = getattr(fresh, dependent)
            values.setdefault(dependent, bases[dependent])
    for name, base in bases.items():
        if name in changes:
            values[name] = _rebuild(
                base, changes[name], ".".join(filter(None, [path, name])), parse
            )
    return dataclasses.replace(group, **values)


# The dispatch fields `model.moe` had before each strategy's options were nested under its name
# (`model.moe.dispatch.options.*`), by the option each became.
_DISPATCH_OPTIONS = {
    "capacity_factor": "capacity_factor",
    "eval_capacity_factor": "eval_capacity_factor",
    "capacity_priority": "priority",
    "capacity_schedule": "schedule",
    "capacity_schedule_spread": "schedule_spread",
    "gmm_impl": "gmm_impl",
    "expert_exchange": "exchange",
    "llep_margin": "margin",
    "llep_max_foreign": "max_foreign",
}


def _dispatch_hint(option: str) -> str:
    having = [
        name
        for name, spec in moe.DISPATCHES.items()
        if option in {f.name for f in dataclasses.fields(spec.options)}
    ]
    return (
        f"it is model.moe.dispatch.options.{option} now, an option of dispatch "
        f"{' and '.join(having)}: model.moe.dispatch.name=... chooses the strategy"
    )


# What each old flat dispatch field of `model.moe` is now, for the error that names it.
_DISPATCH_FIELDS = {
    **{old: _dispatch_hint(option) for old, option in _DISPATCH_OPTIONS.items()},
    "expert_balance": "LLEP is a strategy now: model.moe.dispatch.name=llep",
}
# Where each field of the flat `model` group of configs saved before the split now lives; the
# router's own options are mapped by `_nest_flat_model`.
_FLAT_MODEL_FIELDS = {
    "moe_every": ("moe", "every"),
    **{
        name: ("moe", name)
        for name in (
            "num_experts",
            "top_k",
            "expert_d_ff",
            "dispatch",
            "num_shared_experts",
            "shared_expert_d_ff",
            "halting_threshold",
            *_DISPATCH_OPTIONS,
            "expert_balance",
        )
    },
    "router": ("router", "name"),
    "load_balance_weight": ("router", "load_balance_weight"),
    "router_z_weight": ("router", "router_z_weight"),
    **{
        name: ("depth", name)
        for name in ("mod_every", "mod_capacity", "mod_predictor_weight", "layer_router_dim")
    },
}
_FLAT_ROUTER_OPTIONS = {
    "renormalize_top_k": "renormalize",
    "top_p": "top_p",
    "router_entropy_weight": "entropy_weight",
    "graph_mix": "mix",
    "recurrent_state_dim": "state_dim",
    "relu_sparsity_weight": "sparsity_weight",
    "chunk_sparsity_weight": "chunk_sparsity_weight",
}

# Where each flat field of the `pruning` group before its choices were nested under their names
# (`pruning.pattern.options.n`) now lives; `method`, `pattern` and `schedule` are groups now.
_FLAT_PRUNING_FIELDS = {
    "mode": ("method", "name"),
    "srste_decay": ("method", "options", "decay"),
    **{name: ("method", "options", name) for name in ("flow_begin", "flow_end", "flow_intervals")},
    "scope": ("pattern", "options", "scope"),
    "density": ("pattern", "options", "density"),
    "n": ("pattern", "options", "n"),
    "m": ("pattern", "options", "m"),
    "nm_axis": ("pattern", "options", "axis"),
    "slice_axis": ("pattern", "options", "axis"),
    "block_rows": ("pattern", "options", "rows"),
    "block_cols": ("pattern", "options", "cols"),
    **{
        name: ("schedule", "options", name)
        for name in ("begin_step", "end_step", "frequency", "rounds", "initial_sparsity")
    },
}
# Fields moved out of a group, by the group's path: their hint names the new path.
_MOVED_FIELDS = {"model": _FLAT_MODEL_FIELDS, "pruning": _FLAT_PRUNING_FIELDS}


# Fields of the flat `attention` group before each kind got its own options: now options of
# the kinds that have them, `attention.options.<field>`.
_FLAT_ATTENTION_OPTIONS = (
    "top_k",
    "window",
    "num_global",
    "query_block_size",
    "num_clusters",
    "centroid_momentum",
    "shared_qk",
)


def _flat_attention_hint(field: str) -> str:
    kinds = [
        name
        for name, spec in ATTENTION_KINDS.items()
        if field in {f.name for f in dataclasses.fields(spec.options)}
    ]
    return (
        f" (it is attention.options.{field} now, an option of the attention kinds "
        f"{', '.join(kinds)}: set attention.kind first)"
    )


def _nest_flat_attention(flat: dict[str, Any]) -> dict[str, Any]:
    """A flat `attention` group (every kind's options side by side) in today's layout: the
    options the named kind has go under `options`; the others did nothing and are dropped."""
    kind = flat.get("kind")
    spec = ATTENTION_KINDS.get(kind) if isinstance(kind, str) else None
    option_fields = {f.name for f in dataclasses.fields(spec.options)} if spec else set()
    nested: dict[str, Any] = {"options": {}}
    for name, value in flat.items():
        if name not in _FLAT_ATTENTION_OPTIONS:
            nested[name] = value
        elif name in option_fields:
            nested["options"][name] = value
    return nested


def _is_flat_model(model: dict[str, Any]) -> bool:
    return isinstance(model.get("router"), str) or "num_experts" in model


def _nest_flat_model(flat: dict[str, Any]) -> dict[str, Any]:
    """A flat `model` group (moejax before the `moe`/`router`/`depth` split) in today's
    layout. Router options the named router does not have are dropped: they did nothing."""
    from moejax import routers

    nested: dict[str, Any] = {"moe": {}, "router": {}, "depth": {}}
    router = flat.get("router", RouterConfig().name)
    options_class = routers.get(router).options if router in routers.ROUTERS else None
    option_fields = {f.name for f in dataclasses.fields(options_class)} if options_class else set()
    options = {}
    for name, value in flat.items():
        if name in _FLAT_MODEL_FIELDS:
            group, field = _FLAT_MODEL_FIELDS[name]
            nested[group][field] = value
        elif name in _FLAT_ROUTER_OPTIONS:
            if _FLAT_ROUTER_OPTIONS[name] in option_fields:
                options[_FLAT_ROUTER_OPTIONS[name]] = value
        else:
            nested[name] = value
    nested["router"]["options"] = options
    return nested


def _typed_json_value(field: str, value: Any, annotation: Any) -> Any:
    """`value` read from JSON for a field of type `annotation`; the wrong type is a ConfigError
    (JSON has one number type, so an integer is a valid float)."""
    if typing.get_origin(annotation) is tuple:
        (element, _) = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{field}: value {value!r:.80} is not a list")
        return tuple(_typed_json_value(field, item, element) for item in value)
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
    """Writes `to_json(config)` to `path`."""
    Path(path).write_text(to_json(config))


def load_json(path: str | Path) -> Config:
    """The `Config` of a `config.json` written by `save_json` (or by an older moejax)."""
    return from_dict(json.loads(Path(path).read_text()))
