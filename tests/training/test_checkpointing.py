"""Resume, preemption, non-finite losses and damaged checkpoints."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from moejax.evaluation import evaluate_workdir
from moejax.training import state as state_lib
from moejax.training.checkpoint import Checkpointer
from moejax.training.loop import NonFiniteLossError, train

ROOT = Path(__file__).resolve().parents[2]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _train_command(workdir, data_dir, steps):
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        str(ROOT / "configs/tiny.py"),
        "--workdir",
        str(workdir),
        "--no-progress",
        f"--config.data.data_dir={data_dir}",
        f"--config.train.steps={steps}",
        "--config.train.checkpoint_every=10",
        f"--config.train.eval_every={steps}",
        "--config.train.log_every=10",
        "--config.train.warmup_steps=10",
    ]


def _wait_for_checkpoint(process, checkpoints: Path, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir()):
            return
        if process.poll() is not None:
            raise AssertionError(f"training exited ({process.returncode}) before a checkpoint")
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def _restore_params(workdir, config, step):
    mesh_devices = jax.devices()[:1]
    from moejax import sharding

    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, mesh_devices)
    layout = state_lib.state_layout(config, mesh)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=3, async_save=False)
    try:
        state, data_state = checkpointer.restore(step, layout.restore_target())
    finally:
        checkpointer.close()
    return state, data_state


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tiny_config, data_dir, tmp_path):
    steps = 300
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(
        _train_command(straight, data_dir, steps), env=_env(), check=True, capture_output=True
    )

    process = subprocess.Popen(
        _train_command(killed, data_dir, steps),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_checkpoint(process, killed / "checkpoints")
    process.send_signal(signal.SIGKILL)
    process.wait()
    survivors = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert survivors and survivors[-1] < steps, survivors

    resumed = subprocess.run(
        _train_command(killed, data_dir, steps),
        env=_env(),
        check=True,
        capture_output=True,
        text=True,
    )
    assert f"resumed from step {survivors[-1]}" in resumed.stderr

    config = tiny_config(f"train.steps={steps}", "train.warmup_steps=10")
    a, a_data = _restore_params(straight, config, steps)
    b, b_data = _restore_params(killed, config, steps)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert a_data == b_data


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data_dir, tmp_path):
    workdir = tmp_path / "run"
    command = _train_command(workdir, data_dir, 100_000)
    process = subprocess.Popen(
        command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_checkpoint(process, workdir / "checkpoints")
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    message = next(line for line in stdout.splitlines() if "SIGTERM received" in line)
    saved_step = int(message.rsplit(" ", 1)[-1])
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == saved_step
    assert f"finished at step {saved_step}" in stdout


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
    workdir = tmp_path / "run"
    train(tiny_config("train.steps=20"), workdir, devices=jax.devices()[:1], progress=False)
    checkpoint_20 = workdir / "checkpoints" / "20"
    before = {p: p.read_bytes() for p in checkpoint_20.rglob("*") if p.is_file()}

    # An absurd learning rate turns the parameters non-finite after one update.
    exploding = tiny_config("train.steps=40", "train.learning_rate=1e30")
    with pytest.raises(NonFiniteLossError, match=r"nan at step 2[1-5]"):
        train(
            exploding,
            workdir,
            devices=jax.devices()[:1],
            progress=False,
            allow_config_change=True,
        )

    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 20
    after = {p: p.read_bytes() for p in checkpoint_20.rglob("*") if p.is_file()}
    assert after == before


def test_damaged_latest_checkpoint_falls_back_with_a_warning(tiny_config, tmp_path, caplog):
    workdir = tmp_path / "run"
    config = tiny_config("train.steps=20")
    train(config, workdir, devices=jax.devices()[:1], progress=False)
    for path in (workdir / "checkpoints" / "20").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    results = evaluate_workdir(workdir, devices=jax.devices()[:1])
    assert results["step"] == 10 and results["damaged_steps"] == [20]
    assert "checkpoint at step 20 is not usable (unreadable" in caplog.text

    result = train(config, workdir, devices=jax.devices()[:1], progress=False)
    assert result.restored_from == 10 and result.step == 20
    assert (workdir / "checkpoints_damaged" / "20").is_dir()
    assert evaluate_workdir(workdir, devices=jax.devices()[:1])["damaged_steps"] == []


def test_eval_restores_onto_another_mesh(tiny_config, tmp_path):
    workdir = tmp_path / "run"
    train(tiny_config(), workdir, devices=jax.devices()[:1], progress=False)
    one = evaluate_workdir(workdir, devices=jax.devices()[:1])
    eight = evaluate_workdir(workdir, overrides=["mesh.data=2", "mesh.expert=4"])
    assert eight["mesh"] == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    np.testing.assert_allclose(eight["loss"], one["loss"], rtol=1e-5)
    np.testing.assert_allclose(
        eight["moe/layer0/expert_load"], one["moe/layer0/expert_load"], atol=1e-6
    )
    assert 0.0 < one["bits_per_byte"] < 8.0
    # Routing fluctuation since the checkpoint before, on the same fixed batch, on either mesh.
    assert one["compare_step"] == eight["compare_step"] is not None
    assert 0.0 <= one["moe/layer0/routing_fluctuation"] <= 1.0
    np.testing.assert_allclose(
        eight["moe/layer0/routing_fluctuation"], one["moe/layer0/routing_fluctuation"]
    )
    with pytest.raises(ValueError, match="only mesh.*data.*model.halting_threshold"):
        evaluate_workdir(workdir, overrides=["model.num_experts=8"])
