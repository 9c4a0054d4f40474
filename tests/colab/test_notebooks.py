"""Every notebook in colab/ runs top to bottom as a notebook (nbclient, one kernel each), from a
clean state, in its quick form (`MOEJAX_NOTEBOOK_QUICK=1`: fewer steps, same cells)."""

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))
# Per notebook: a notebook that takes longer than this on 2 CPU cores is too slow for Colab's
# promise of "a few minutes" and for CI.
CELL_TIMEOUT_S = 300


def test_every_notebook_is_committed_without_outputs():
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, (
                    f"{path.name}: commit notebooks with outputs cleared"
                )


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, monkeypatch, tmp_path):
    # The kernel inherits this environment: the quick form, and JAX's own device count (the
    # notebooks that need fake devices set XLA_FLAGS themselves, before importing jax). Its
    # temporary folder is this test's, so notebooks running side by side (pytest -n) never share
    # a dataset being written or a workdir.
    monkeypatch.setenv("MOEJAX_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the cell and its traceback
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
