"""Test set-up: eight fake CPU devices, requested before jax is imported anywhere."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for every test process and the train.py / eval.py processes they start:
# the same small steps compile in dozens of tests, and a process's start-up is mostly compiling.
# Entries are keyed by the computation and the JAX version, so a stale one is never used.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"moejax-test-jax-cache-{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    # Modules with a `slow` test (whole training processes, notebooks: minutes each) run first,
    # each kept whole for its module fixtures: pytest-xdist hands out tests in this order, and a
    # minutes-long test dealt last keeps one worker busy while the other has nothing left to do.
    slow_modules = {item.module.__name__ for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)
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
