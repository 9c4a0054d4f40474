"""The public API: `moejax.__all__` names what `import moejax` gives, every public name has a
docstring, and the API reference page builds from those docstrings (pdoc, as CI builds it)."""

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import moejax

ROOT = Path(__file__).resolve().parents[2]


def test_all_names_exist_and_version_is_set():
    missing = [name for name in moejax.__all__ if not hasattr(moejax, name)]
    assert not missing
    assert moejax.__version__.split(".")[0].isdigit()
    assert len(set(moejax.__all__)) == len(moejax.__all__)


def test_the_layers_and_configs_are_importable_from_the_top():
    from moejax import AttentionConfig, MoEConfig, MoELayer, RouterConfig, SparseAttention

    assert MoELayer.__module__ == "moejax.models.moe_layer"
    assert SparseAttention.__module__ == "moejax.sparse_attention.layer"
    assert {MoEConfig, RouterConfig, AttentionConfig} <= {
        getattr(moejax, n) for n in moejax.__all__
    }


@pytest.mark.parametrize("name", [n for n in moejax.__all__ if n != "__version__"])
def test_every_public_name_has_a_docstring(name):
    value = getattr(moejax, name)
    doc = inspect.getdoc(value)
    assert doc and len(doc.split()) >= 4, f"moejax.{name} needs a docstring"
    if inspect.ismodule(value):
        for member in getattr(value, "__all__", []):
            obj = getattr(value, member)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                assert inspect.getdoc(obj), f"{value.__name__}.{member} needs a docstring"


def test_api_reference_builds(tmp_path):
    """`pdoc moejax -o DIR` writes one page per public module; the top page lists `MoELayer`."""
    pytest.importorskip("pdoc")
    result = subprocess.run(
        [sys.executable, "-m", "pdoc", "moejax", "-o", str(tmp_path), "--docformat", "google"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    index = (tmp_path / "moejax.html").read_text()
    assert "MoELayer" in index and "RouterConfig" in index
    for module in ("routers", "sparse_attention", "pruning", "parallel/sharding", "config"):
        assert (tmp_path / "moejax" / f"{module}.html").exists(), module
    assert importlib.import_module("moejax.routers")
