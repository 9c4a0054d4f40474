"""Every notebook in colab/ runs top to bottom (its code cells, in order, in one process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "colab").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(notebook, data_dir, tmp_path):
    cells = json.loads(notebook.read_text())["cells"]
    code = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    # The notebook builds the dataset in the config's data_dir; point it at the session's copy.
    assert '"train.steps=60"' in code
    code = code.replace('"train.steps=60"', f'"data.data_dir={data_dir}", "train.steps=60"')
    script = tmp_path / f"{notebook.stem}.py"
    script.write_text(code)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "max difference" in result.stdout
