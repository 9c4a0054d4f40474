"""Small, fast training runs shared by the training tests."""

import shutil
from pathlib import Path

import pytest
import run_processes

from moejax import config as config_lib

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny_config(data_dir):
    """configs/tiny.py reading the session's dataset; returns a function taking overrides."""

    def make(*overrides: str) -> config_lib.Config:
        config = config_lib.load_config_file(ROOT / "configs" / "tiny.py")
        return config_lib.apply_overrides(config, [f"data.data_dir={data_dir}", *overrides])

    return make


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, data_dir) -> Path:
    """A finished run of `run_processes.finished_run_config`, trained once per test process."""
    import jax

    from moejax.training.loop import train

    workdir = tmp_path_factory.mktemp("finished") / "run"
    train(
        run_processes.finished_run_config(data_dir),
        workdir,
        devices=jax.devices()[:1],
        progress=False,
    )
    return workdir


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A fresh copy of `finished_run` for one test to change."""
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy
