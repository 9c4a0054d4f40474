"""The attention-kind registry: names are looked up, never compared; a spec declares what its
plan takes and is refused at registration when it does not."""

import ast
import dataclasses
import pathlib

import pytest

from moejax.sparse_attention import KINDS, AttentionKindSpec, KindOptions, get, register
from moejax.sparse_attention.base import KindStateSpec
from moejax.sparse_attention.dense import DenseOptions, dense_plan

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_unknown_kind_is_an_error_listing_the_registered_ones():
    with pytest.raises(ValueError, match="attention.kind: got 'strided'; allowed: (.*)") as error:
        get("strided")
    assert str(error.value).endswith(", ".join(KINDS))
    assert list(KINDS)[0] == "dense"


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="attention.kind: got 'dense'; allowed: a name not"):
        register(AttentionKindSpec("dense", dense_plan, options=DenseOptions))


def test_every_kind_lives_in_the_file_named_after_it():
    for name, spec in KINDS.items():
        assert spec.name == name
        assert spec.plan.__module__ == f"moejax.sparse_attention.{name}"
        assert spec.options.__module__ == f"moejax.sparse_attention.{name}"


def _plan(*, length, block_size, options):
    return dense_plan(length=length, block_size=block_size, options=options)


def _plan_reading_keys(*, length, block_size, options, keys):
    return dense_plan(length=length, block_size=block_size, options=options)


@dataclasses.dataclass(frozen=True)
class NoDefault(KindOptions):
    stride: int


@dataclasses.dataclass(frozen=True)
class BadDefault(KindOptions):
    stride: int = 0

    def __post_init__(self):
        if self.stride < 1:
            raise ValueError(f"attention.options.stride: got {self.stride}; allowed: >= 1")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"plan": None}, r"AttentionKindSpec\('toy'\).plan: got None"),
        ({"plan": _plan_reading_keys}, r"\.needs: got \['keys'\]; allowed: every input"),
        ({"plan": _plan_reading_keys, "needs": ("key",)}, r"\.needs: got \['key'\]"),
        ({"needs": ("params",)}, r"\.init_params: got None"),
        (
            {"param_axes": {"w": ("embed",)}},
            r"\.param_axes: got \{'w': \('embed',\)\}",
        ),
        ({"needs": ("state",)}, r"\.state: got None"),
        (
            {"state": KindStateSpec("s", lambda key, shape, options: None, ())},
            r"\.state: got KindStateSpec",
        ),
        ({"options": dict}, r"\.options: got <class 'dict'>"),
        ({"options": NoDefault}, r"\.options: got \['stride'\]; allowed: fields with defaults"),
        ({"needs": ("values",)}, r"\.plan: got \['values'\]; allowed: keywords the plan"),
        ({"options": BadDefault}, r"\.options: its defaults are refused: .*stride: got 0"),
    ],
)
def test_a_spec_that_does_not_declare_what_it_needs_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttentionKindSpec(**{"name": "toy", "plan": _plan, **kwargs})
    assert "toy" not in KINDS


def test_no_kind_name_is_compared_in_the_package():
    """A kind is chosen through its spec: no `x == "moba"` or `x in ("dense", ...)` anywhere."""
    found = []
    for path in sorted((ROOT / "moejax").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
            elif isinstance(node, ast.MatchValue):
                sides = [node.value]
            else:
                continue
            for side in sides:
                elements = side.elts if isinstance(side, ast.Tuple | ast.List | ast.Set) else [side]
                found += [
                    f"{path.relative_to(ROOT)}:{node.lineno} {e.value!r}"
                    for e in elements
                    if isinstance(e, ast.Constant) and e.value in KINDS
                ]
    assert not found
