"""The real Fashion-MNIST dataset, built once per session (CI installs it with setup.sh)."""

import pathlib

import pytest


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    from moejax.data import fashion_mnist

    path = tmp_path_factory.mktemp("fmnist_tfds")
    fashion_mnist.prepare(path)
    return path
