"""A checkpoint saved with the experts over 4 devices restores onto other layouts (experts over
2, one device, two processes) with every leaf bit-identical and laid out as the new mesh says."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import run_processes as processes

from moejax.parallel import sharding
from moejax.training import state as state_lib
from moejax.training.loop import train
from moejax.training.restore import restore_checkpoint

STEP = 3
# Experts over shards are expert parallelism, named by the strategy; one device runs dropless.
SAVED_MESH = ("mesh.data=2", "mesh.expert=4", "model.moe.dispatch.name=expert_parallel")
ONE_DEVICE = ("mesh.data=1", "mesh.expert=1", "model.moe.dispatch.name=dropless")


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, data_dir) -> Path:
    """A few steps of configs/tiny.py with experts over 4 of the 8 devices, checkpointed."""
    from moejax import config as config_lib

    config = config_lib.apply_overrides(
        config_lib.load_config_file(processes.ROOT / "configs" / "tiny.py"),
        [
            f"data.data_dir={data_dir}",
            f"train.steps={STEP}",
            f"train.checkpoint_every={STEP}",
            f"train.eval_every={STEP}",
            "train.log_every=1",
            "train.warmup_steps=1",
            *SAVED_MESH,
        ],
    )
    workdir = tmp_path_factory.mktemp("resharded") / "run"
    train(config, workdir, progress=False)
    return workdir


def _restore(workdir: Path, mesh_overrides: tuple[str, ...], devices) -> dict[str, np.ndarray]:
    """The checkpoint on `devices` under the run's config with `mesh_overrides`, as host arrays
    by tree path; checks that every leaf has the layout's sharding."""
    from moejax import config as config_lib
    from moejax.training.restore import read_run

    config = config_lib.apply_overrides(read_run(workdir), list(mesh_overrides))
    mesh = sharding.make_mesh(config_lib.validate(config, len(devices)), devices)
    target = state_lib.state_layout(config, mesh).restore_target()
    state = restore_checkpoint(workdir, config, target, step=STEP).state
    for leaf, wanted in zip(jax.tree.leaves(state), jax.tree.leaves(target), strict=True):
        assert leaf.sharding.is_equivalent_to(wanted.sharding, leaf.ndim)
    return {
        jax.tree_util.keystr(path): np.asarray(leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(jax.device_get(state))
    }


def _assert_bit_identical(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def _expert_shards(workdir: Path, mesh_overrides: tuple[str, ...]) -> int:
    """How many devices one expert weight is split over under `mesh_overrides`."""
    from moejax import config as config_lib
    from moejax.training.restore import read_run

    config = config_lib.apply_overrides(read_run(workdir), list(mesh_overrides))
    mesh = sharding.make_mesh(config_lib.validate(config, 8), jax.devices())
    layout = state_lib.state_layout(config, mesh)
    shardings = jax.tree_util.tree_leaves_with_path(layout.shardings["params"])
    expert = next(s for path, s in shardings if "w_gate" in jax.tree_util.keystr(path))
    return len({index[0] for index in expert.devices_indices_map((4, 32, 32)).values()})


@pytest.fixture(scope="module")
def saved_values(saved_run) -> dict[str, np.ndarray]:
    return _restore(saved_run, SAVED_MESH, jax.devices())


@pytest.mark.parametrize(
    "mesh_overrides",
    [
        ("mesh.data=4", "mesh.expert=2"),
        ("mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"),
    ],
    ids=["data4_expert2", "fsdp2_expert2_tensor2"],
)
def test_restore_onto_fewer_expert_shards_is_bit_identical(saved_run, saved_values, mesh_overrides):
    assert _expert_shards(saved_run, SAVED_MESH) == 4
    assert _expert_shards(saved_run, mesh_overrides) == 2
    _assert_bit_identical(_restore(saved_run, mesh_overrides, jax.devices()), saved_values)


def test_restore_on_one_device_is_bit_identical(saved_run, saved_values):
    _assert_bit_identical(_restore(saved_run, ONE_DEVICE, jax.devices()[:1]), saved_values)


@pytest.mark.slow
def test_restore_across_two_processes_is_bit_identical(saved_run, saved_values, tmp_path):
    port = processes.free_port()
    out = tmp_path / "restored.npz"
    worker = Path(__file__).with_name("restore_worker.py")
    launched = [
        subprocess.Popen(
            [
                sys.executable,
                str(worker),
                str(port),
                str(process_id),
                str(saved_run),
                str(STEP),
                str(out),
                "mesh.data=4",
                "mesh.expert=2",
            ],
            env=processes.env(devices=4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for process_id in range(2)
    ]
    for process in launched:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-3000:]
    with np.load(out) as restored:
        _assert_bit_identical(dict(restored), saved_values)


@pytest.mark.slow
def test_eval_py_on_two_processes_matches_one_process(saved_run, tmp_path):
    """eval.py joined by two processes (experts over 2 devices of each): the same validation
    numbers and sample as one process, written once, by process 0."""
    from moejax.evaluation import evaluate_workdir

    expected = evaluate_workdir(
        saved_run,
        step=STEP,
        overrides=list(ONE_DEVICE),
        devices=jax.devices()[:1],
        sample_bytes=16,
        sample_prompt=b"ROMEO:\n",  # eval.py's default prompt
    )
    port = processes.free_port()
    command = [
        sys.executable,
        str(processes.ROOT / "eval.py"),
        "--workdir",
        str(saved_run),
        "--step",
        str(STEP),
        "--sample_bytes",
        "16",
        # fsdp outermost: each process holds half of every weight matrix.
        "--config.mesh.data=1",
        "--config.mesh.fsdp=2",
        "--config.mesh.expert=2",
        "--config.mesh.tensor=2",
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
    ]
    launched = [
        subprocess.Popen(
            [*command, f"--process_id={process_id}"],
            env=processes.env(devices=4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for process_id in range(2)
    ]
    outputs = [process.communicate(timeout=300) for process in launched]
    for process, (_, err) in zip(launched, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    assert "wrote" in outputs[0][0]
    # Only gloo's connection lines: process 1 neither prints results nor writes files.
    assert "validation loss" not in outputs[1][0] and "wrote" not in outputs[1][0]
    written = json.loads((saved_run / "eval" / f"step_{STEP}.json").read_text())
    assert written["mesh"] == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}
    np.testing.assert_allclose(written["loss"], expected["loss"], rtol=1e-5)
    assert written["tokens"] == expected["tokens"]
    assert written["sample"] == expected["sample"]
