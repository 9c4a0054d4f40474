"""Stop requests (SIGTERM, SIGINT) and the workdir lock, against train.py as a process."""

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import run_processes as processes

from moejax.training.preemption import StopRequest

STEPS = 240
# Logging and evaluation off the checkpoint grid: a stop lands inside either block often.
INTERVALS = ("train.log_every=3", "train.eval_every=7", "train.checkpoint_every=10")


def _announced_step(stdout: str, signal_name: str) -> int | None:
    marker = f"{signal_name} received: checkpoint saved at step "
    lines = [line for line in stdout.splitlines() if line.startswith(marker)]
    return int(lines[-1].removeprefix(marker)) if lines else None


def _on_disk_when_announced(process, out, workdir, signal_name: str):
    """(the announced step, the committed steps the moment the announcement was printed), or
    (None, None) when the process exits without announcing one."""
    while (step := _announced_step(out.read_text(), signal_name)) is None:
        if process.poll() is not None and _announced_step(out.read_text(), signal_name) is None:
            return None, None
        time.sleep(0.002)
    return step, processes.committed_steps(workdir)


@pytest.mark.slow
def test_stops_at_random_moments_save_what_they_announce_and_resume_bit_identical(
    tiny_config, data_dir, tmp_path
):
    """Four stops (two SIGTERM, two SIGINT) at random moments of one run, each resumed: every
    announced step is on disk right after the exit, and the run ends bit-identical to an
    uninterrupted one, with each step's metrics once."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    subprocess.run(
        processes.train_command(straight, data_dir, STEPS, *INTERVALS),
        env=processes.env(),
        check=True,
        capture_output=True,
    )
    chooser = random.Random(0)
    announced = []
    for trial in range(4):
        signal_kind = (signal.SIGTERM, signal.SIGINT)[trial % 2]
        process, out, err = processes.start(
            processes.train_command(stopped, data_dir, STEPS, *INTERVALS), tmp_path, f"t{trial}"
        )
        # From the first log line on: start-up, compilation, the step-0 evaluation, training.
        processes.wait_for_text(process, err, "model:")
        time.sleep(chooser.uniform(0.0, 1.8))
        if process.poll() is None:
            process.send_signal(signal_kind)
        step, on_disk = _on_disk_when_announced(process, out, stopped, signal_kind.name)
        assert process.wait(timeout=180) == 0, err.read_text()[-3000:]
        if step is None:
            assert f"finished at step {STEPS}" in out.read_text()
            continue
        assert step in on_disk, (trial, step, on_disk)
        assert not list((stopped / "checkpoints").glob("*tmp*")), trial
        assert f"finished at step {step}" in out.read_text()
        announced.append(step)
    assert len(announced) >= 3, announced

    subprocess.run(
        processes.train_command(stopped, data_dir, STEPS, *INTERVALS),
        env=processes.env(),
        check=True,
        capture_output=True,
    )
    config = tiny_config(f"train.steps={STEPS}", "train.warmup_steps=10")
    processes.assert_same_checkpoint(straight, stopped, config, STEPS)
    # A stop logs its step off the logging grid; every step the straight run logged is there,
    # and no step twice.
    logged = processes.metric_steps(stopped)
    assert len(logged) == len(set(logged))
    assert set(processes.metric_steps(straight)) <= set(logged)
    assert [s for s in logged if s[1] == "eval"] == [
        s for s in processes.metric_steps(straight) if s[1] == "eval"
    ]


@pytest.mark.slow
def test_a_busy_workdir_refuses_a_second_train_py_and_a_second_sigterm_spares_the_final_save(
    tiny_config, data_dir, tmp_path
):
    """One endless run (one process start-up, one compile) for two behaviours: a second
    train.py on its workdir is refused by the lock while the first trains on; then two SIGTERMs
    50 ms apart, the second during the save the first asked for, which still completes."""
    workdir = tmp_path / "run"
    # Endless, so that the first run still holds the lock however slowly the second starts.
    first, first_out, first_err = processes.start(
        processes.train_command(workdir, data_dir, 100_000, *INTERVALS), tmp_path, "first"
    )
    processes.wait_for_text(first, first_out, "step 7:")
    second = subprocess.run(
        processes.train_command(workdir, data_dir, 100_000, *INTERVALS),
        env=processes.env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert first.poll() is None, first_err.read_text()[-3000:]
    assert second.returncode == 2
    assert f"another train.py is training there (pid {first.pid} on host" in second.stderr
    assert "Traceback" not in second.stderr

    first.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    step, on_disk = _on_disk_when_announced(first, first_out, workdir, "SIGTERM")
    assert step is not None and step in on_disk, (step, on_disk)
    assert first.wait(timeout=300) == 0, first_err.read_text()[-3000:]
    assert not list((workdir / "checkpoints").glob("*tmp*"))
    assert step == _announced_step(first_out.read_text(), "SIGTERM")
    assert step == processes.committed_steps(workdir)[-1]
    config = tiny_config("train.steps=100000", "train.warmup_steps=10")
    for saved in processes.committed_steps(workdir):
        processes.restore(workdir, config, saved)
    steps = processes.metric_steps(workdir)
    assert len(steps) == len(set(steps))


def test_a_stop_request_keeps_the_first_signal_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.should_stop(1)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop(2)
        assert stop.signal_name == "SIGINT"
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_sigterm_after_a_launcher_initialised_jax_distributed_stops_and_saves(data_dir, tmp_path):
    """A launcher's jax.distributed.initialize installs JAX's preemption notifier on SIGTERM
    (one process here, a real coordinator on localhost); the run's own handler takes the signal
    all the same and stops at the next step boundary with that step saved."""
    port = processes.free_port()
    workdir = tmp_path / "run"
    command = processes.train_command(workdir, data_dir, 100_000, *INTERVALS)
    command[1:2] = [str(Path(__file__).with_name("distributed_train.py")), str(port)]
    process, out, err = processes.start(command, tmp_path, "run")
    processes.wait_for_text(process, out, "step 7:")
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=180)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"still running 180 s after SIGTERM:\n{err.read_text()[-3000:]}")
    assert code == 0, err.read_text()[-3000:]
    step = _announced_step(out.read_text(), "SIGTERM")
    assert step is not None and step >= 7, out.read_text()[-2000:]
    assert step in processes.committed_steps(workdir)
