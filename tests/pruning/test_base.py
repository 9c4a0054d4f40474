"""The four pruning registries: built-ins registered by importing `moejax.pruning`, unknown
names listing the registered ones, taken names refused, specs checked when built."""

import dataclasses

import pytest

from moejax.pruning import (
    METHODS,
    PATTERNS,
    SCHEDULES,
    SCORES,
    MethodSpec,
    PatternSpec,
    PruningOptions,
    ScheduleSpec,
    ScoreSpec,
    get_method,
    get_pattern,
    get_schedule,
    get_score,
    register,
)
from moejax.pruning.base import options_of
from moejax.pruning.patterns import NMOptions


def test_the_built_ins_are_registered():
    assert set(PATTERNS) >= {"unstructured", "nm", "block", "neuron", "expert", "layer"}
    assert set(SCORES) >= {"magnitude", "random", "snip"}
    assert set(SCHEDULES) >= {"one_shot", "iterative", "polynomial", "none"}
    assert set(METHODS) >= {"none", "masked", "srste", "maskllm", "dsnot", "lottery"}
    assert not get_method("none").prunes and get_method("masked").prunes


@pytest.mark.parametrize(
    "get, kind, registered",
    [
        (get_pattern, "pattern", PATTERNS),
        (get_score, "score", SCORES),
        (get_schedule, "schedule", SCHEDULES),
        (get_method, "method", METHODS),
    ],
)
def test_an_unknown_name_lists_the_registered_ones(get, kind, registered):
    with pytest.raises(ValueError) as error:
        get("no_such_entry")
    assert str(error.value) == (
        f"pruning {kind}: got 'no_such_entry'; allowed: {', '.join(registered)}"
    )


@pytest.mark.parametrize(
    "spec",
    [
        PatternSpec("nm", lambda scores, names, sparsity, options: scores),
        ScoreSpec("magnitude", lambda params, options: params),
        ScheduleSpec("one_shot", lambda target, options: None),
        MethodSpec("masked"),
    ],
)
def test_a_taken_name_is_refused(spec):
    before = {name: dict(table) for name, table in _tables().items()}
    with pytest.raises(ValueError, match=f"got '{spec.name}'; allowed: a name not already"):
        register(spec)
    assert {name: dict(table) for name, table in _tables().items()} == before


def _tables():
    return {"patterns": PATTERNS, "scores": SCORES, "schedules": SCHEDULES, "methods": METHODS}


class _NotOptions:
    pass


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: ScoreSpec("s", lambda params, options: params, needs=("activations",)),
            "ScoreSpec('s').needs: got ['activations']; allowed: params, grads, key",
        ),
        (
            lambda: ScoreSpec("s", lambda params, options: params, needs=("params", "grads")),
            "ScoreSpec('s') function <lambda>: got ['grads']; allowed: its keywords",
        ),
        (
            lambda: PatternSpec("p", lambda scores, sparsity, options: scores),
            "PatternSpec('p') function <lambda>: got ['names']",
        ),
        (
            lambda: ScheduleSpec("s", lambda target, options: None, options=_NotOptions),
            "ScheduleSpec('s').options: got",
        ),
        (
            lambda: MethodSpec("m", needs=("calibration",)),
            "MethodSpec('m').refine: got None; allowed: a function when the method declares",
        ),
        (
            lambda: MethodSpec(
                "m", refine=lambda params, masks, *, prunable, options: masks, needs=("loss_fn",)
            ),
            "MethodSpec('m') function <lambda>: got ['loss_fn']",
        ),
        (
            lambda: MethodSpec("m", requires={"optimizer": "adam"}),
            "MethodSpec('m').requires: got ['optimizer']; allowed: keys pattern, score, schedule",
        ),
    ],
)
def test_specs_are_checked_when_built(build, message):
    with pytest.raises(ValueError) as error:
        build()
    assert str(error.value).startswith(message)


def test_options_default_to_the_entry_s_and_refuse_another_entry_s():
    spec = get_pattern("nm")
    assert options_of(spec, None) == NMOptions()
    assert options_of(spec, NMOptions(n=1)) == NMOptions(n=1)

    @dataclasses.dataclass(frozen=True)
    class Other(PruningOptions):
        n: int = 2

    with pytest.raises(ValueError, match="nm options: got .*Other.*; allowed: a NMOptions"):
        options_of(spec, Other())
