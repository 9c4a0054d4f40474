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

import fcntl  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
from collections.abc import Callable  # noqa: E402

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


def built_once(
    tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[pathlib.Path], None]
) -> pathlib.Path:
    """A directory `build` fills once per test run, shared by every pytest-xdist worker: the
    first to ask builds it under a file lock, the others wait for it and then read it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, above each worker's own
    path, done = root / name, root / f"{name}.done"
    with (root / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            build(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def build_once(tmp_path_factory: pytest.TempPathFactory):
    """`built_once` for this run: `build_once(name, build) -> directory`."""
    return lambda name, build: built_once(tmp_path_factory, name, build)


@pytest.fixture(scope="session")
def data_dir(build_once) -> pathlib.Path:
    """The Shakespeare dataset, built once per test run."""
    from moejax.data import shakespeare

    return build_once("tensorflow_datasets", shakespeare.prepare)


@pytest.fixture(scope="session")
def fmnist_dir(build_once) -> pathlib.Path:
    """The real Fashion-MNIST dataset, built once per test run (CI installs it with setup.sh);
    the data tests and the lottery experiment's both read it."""
    from moejax.data import fashion_mnist

    return build_once("fmnist_tfds", fashion_mnist.prepare)


@pytest.fixture
def tiny_config(data_dir):
    """configs/tiny.py reading the session's dataset; returns a function taking overrides."""
    from moejax import config as config_lib

    def make(*overrides: str):
        config = config_lib.load_config_file(
            pathlib.Path(__file__).parents[1] / "configs" / "tiny.py"
        )
        return config_lib.apply_overrides(config, [f"data.data_dir={data_dir}", *overrides])

    return make
