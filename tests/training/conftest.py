"""Small, fast training runs shared by the training tests."""

import shutil
from pathlib import Path

import pytest
import run_processes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def finished_run(build_once, data_dir) -> Path:
    """A finished run of `run_processes.finished_run_config`, trained once per test run (by the
    first pytest-xdist worker to ask; tests change copies of it, never the run itself)."""

    def build(path: Path) -> None:
        import jax

        from moejax.training.loop import train

        train(
            run_processes.finished_run_config(data_dir),
            path / "run",
            devices=jax.devices()[:1],
            progress=False,
        )

    return build_once("finished", build) / "run"


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A fresh copy of `finished_run` for one test to change."""
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy
