"""The errors a user fixes by changing what they asked for, and the one way moejax checks a value.

Every check reads `require(ok, field, value, allowed)`: the message is always
"{field}: got {value!r}; allowed: {allowed}", so a bad argument to a pure function and a bad
config field read the same way. Config groups check themselves with `require_config` in their
`__post_init__`, which raises `ConfigError`.
"""

from collections.abc import Collection


class UserError(ValueError):
    """Input that cannot work: a config value, a workdir, a checkpoint choice. The message names
    the file or field, the value and what is allowed; `train.py` and `eval.py` print it and exit
    with status 2, without a traceback."""

    label = "error"


class ConfigError(UserError):
    """A configuration value that cannot work; the message names field, value and the rule."""

    label = "config error"


def message(field: str, value: object, allowed: str) -> str:
    """The text of every failed check: `"{field}: got {value!r}; allowed: {allowed}"`."""
    return f"{field}: got {value!r}; allowed: {allowed}"


def require(ok: bool, field: str, value: object, allowed: str) -> None:
    """Raises `ValueError(message(field, value, allowed))` unless `ok`: a function's argument."""
    if not ok:
        raise ValueError(message(field, value, allowed))


def require_config(ok: bool, field: str, value: object, allowed: str) -> None:
    """Raises `ConfigError(message(field, value, allowed))` unless `ok`: a config field, named
    by its full path (`model.moe.top_k`) as the command line sets it."""
    if not ok:
        raise ConfigError(message(field, value, allowed))


def require_positive(group: str, obj: object, names: Collection[str]) -> None:
    """`require_config(value > 0, ...)` for each field `names` of the config group `obj`, named
    `{group}.{name}`."""
    for name in names:
        value = getattr(obj, name)
        require_config(value > 0, f"{group}.{name}", value, "a positive number")


def require_non_negative(group: str, obj: object, names: Collection[str]) -> None:
    """`require_config(value >= 0, ...)` for each field `names` of the config group `obj`."""
    for name in names:
        value = getattr(obj, name)
        require_config(value >= 0, f"{group}.{name}", value, ">= 0")


def require_one_of(field: str, value: object, allowed: Collection) -> None:
    """`require_config(value in allowed, ...)` listing the allowed names."""
    require_config(value in allowed, field, value, ", ".join(map(str, allowed)))
