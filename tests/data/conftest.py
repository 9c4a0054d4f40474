"""Builds the Shakespeare dataset once per test session."""

import pathlib

import pytest

from moejax.data import shakespeare


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("tensorflow_datasets")
    shakespeare.prepare(path)
    return path
