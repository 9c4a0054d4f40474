"""Small, fast training runs shared by the training tests."""

from pathlib import Path

import pytest

from moejax import config as config_lib

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny_config(data_dir):
    """configs/tiny.py reading the session's dataset; returns a function taking overrides."""

    def make(*overrides: str) -> config_lib.Config:
        config = config_lib.load_config_file(ROOT / "configs" / "tiny.py")
        return config_lib.apply_overrides(config, [f"data.data_dir={data_dir}", *overrides])

    return make
