"""Test set-up: eight fake CPU devices, requested before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() in ("gpu", "tpu"):
        return
    skip = pytest.mark.skip(reason="needs an accelerator (TPU or GPU)")
    for item in items:
        if "accelerator" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The Shakespeare dataset, built once per test session."""
    from moejax.data import shakespeare

    path = tmp_path_factory.mktemp("tensorflow_datasets")
    shakespeare.prepare(path)
    return path
