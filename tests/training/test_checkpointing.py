"""Resume after SIGKILL, non-finite losses, a damaged newest checkpoint, another mesh."""

import signal
import subprocess
import time

import jax
import numpy as np
import pytest
import run_processes as processes

from moejax.evaluation import evaluate_workdir
from moejax.training.loop import NonFiniteLossError, train


def _wait_for_checkpoint(process, workdir, timeout=120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if processes.committed_steps(workdir):
            return
        if process.poll() is not None:
            raise AssertionError(f"training exited ({process.returncode}) before a checkpoint")
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tiny_config, data_dir, tmp_path):
    # Killed once its first checkpoint (10) is committed, with 50 steps and 5 saves still to
    # go: far more than the 20 ms between looks at the checkpoint directory.
    steps = 60
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    command = processes.train_command
    subprocess.run(
        command(straight, data_dir, steps), env=processes.env(), check=True, capture_output=True
    )

    process = subprocess.Popen(
        command(killed, data_dir, steps),
        env=processes.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _wait_for_checkpoint(process, killed)
    process.send_signal(signal.SIGKILL)
    process.wait()
    survivors = processes.committed_steps(killed)
    assert survivors and survivors[-1] < steps, survivors

    resumed = subprocess.run(
        command(killed, data_dir, steps),
        env=processes.env(),
        check=True,
        capture_output=True,
        text=True,
    )
    assert f"resumed from step {survivors[-1]}" in resumed.stderr

    config = tiny_config(f"train.steps={steps}", "train.warmup_steps=10")
    processes.assert_same_checkpoint(straight, killed, config, steps)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(run, tiny_config):
    """The session's finished run (checkpoints at 10, 20 and 30) resumed with an absurd
    learning rate."""
    checkpoint_30 = run / "checkpoints" / "30"
    before = {p: p.read_bytes() for p in checkpoint_30.rglob("*") if p.is_file()}

    # An absurd learning rate turns the parameters non-finite after one update.
    exploding = tiny_config("train.steps=40", "train.learning_rate=1e30")
    with pytest.raises(NonFiniteLossError, match=r"nan at step 3[1-5]"):
        train(
            exploding,
            run,
            devices=jax.devices()[:1],
            progress=False,
            allow_config_change=True,
        )

    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] == 30
    after = {p: p.read_bytes() for p in checkpoint_30.rglob("*") if p.is_file()}
    assert after == before


def test_damaged_latest_checkpoint_falls_back_with_a_warning(run, data_dir, caplog):
    config = processes.finished_run_config(data_dir)
    for path in (run / "checkpoints" / "30").rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    results = evaluate_workdir(run, devices=jax.devices()[:1])
    assert results["step"] == 20 and results["damaged_steps"] == [30]
    assert "checkpoint at step 30 is not usable (unreadable" in caplog.text

    result = train(config, run, devices=jax.devices()[:1], progress=False)
    assert result.restored_from == 20 and result.step == 30
    assert (run / "checkpoints_damaged" / "30").is_dir()
    assert evaluate_workdir(run, devices=jax.devices()[:1])["damaged_steps"] == []


def test_eval_restores_onto_another_mesh(run):
    workdir = run  # the session's finished run, 30 steps on one device
    one = evaluate_workdir(workdir, devices=jax.devices()[:1])
    # Experts over 4 shards: the strategy that splits them is named with the mesh.
    eight = evaluate_workdir(
        workdir,
        overrides=["mesh.data=2", "mesh.expert=4", "model.moe.dispatch.name=expert_parallel"],
    )
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
    with pytest.raises(ValueError, match="only mesh.*data.*model.moe.halting_threshold"):
        evaluate_workdir(workdir, overrides=["model.moe.num_experts=8"])
