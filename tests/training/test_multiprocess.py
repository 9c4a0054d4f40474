"""train.py as two processes on localhost (4 CPU devices each, gloo collectives) against one
process on 8 devices: the same run, the same data order, stopped by SIGTERM and resumed."""

import json
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import run_processes as processes

from moejax.training.loop import train

STEPS = 24
SETTINGS = (
    # The expert axis outermost: process 0 holds experts 0-1, process 1 experts 2-3, so the
    # all-to-all crosses processes; tensor=2 splits each expert within a process.
    "mesh.data=1",
    "mesh.expert=4",
    "model.moe.dispatch.name=expert_parallel",
    "mesh.tensor=2",
    # One layer has every exchange and reduction of two, at less compile time in each process.
    "model.num_layers=1",
    "train.checkpoint_every=6",
    "train.log_every=10",
    f"train.eval_every={STEPS}",
    "train.warmup_steps=10",
)
# float32 parameters after 24 Adam steps: the two layouts sum gradients over the 8 devices in
# different orders (gloo across processes, in-process reductions within one), so they agree to
# float32 rounding, amplified a little by training; measured 1.5e-6 of each tensor's largest
# entry after 80 steps.
RELATIVE_TOLERANCE = 1e-4


def _start_two(workdir: Path, data_dir: Path, log_dir: Path, name: str):
    command = processes.train_command(workdir, data_dir, STEPS, *SETTINGS)
    return processes.start_distributed([command, command], log_dir, name)


def _wait_all(started, timeout: float = 300.0) -> None:
    for process, _, err in started:
        assert process.wait(timeout=timeout) == 0, err.read_text()[-3000:]


def _train_losses(workdir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    # The loss of the logged step itself: the mean over the interval since the last log changes
    # where a stop and resume split an interval.
    return {line["step"]: line["loss"] for line in lines if line["split"] == "train"}


@pytest.mark.slow
def test_two_processes_stopped_and_resumed_match_one_process(data_dir, tmp_path, tiny_config):
    reference = tmp_path / "one_process"
    train(
        tiny_config(f"train.steps={STEPS}", *SETTINGS), reference, progress=False
    )  # the 8 devices of the test process

    workdir = tmp_path / "two_processes"
    started = _start_two(workdir, data_dir, tmp_path, "first")
    (first, first_out, _), (second, _, second_err) = started
    processes.wait_for_text(first, first_out, "step 0 (untrained)")
    while 6 not in processes.committed_steps(workdir):
        assert first.poll() is None, first_out.read_text()[-2000:]
        time.sleep(0.05)
    # To one process only, while step 6's save is finishing: the other hears of it through the
    # coordination service, and both stop at the agreed step.
    second.send_signal(signal.SIGTERM)
    _wait_all(started)
    marker = "SIGTERM to process 1 received: checkpoint saved at step "
    stopped = [
        int(line.removeprefix(marker))
        for line in first_out.read_text().splitlines()
        if line.startswith(marker)
    ]
    assert stopped and 6 <= stopped[0] < STEPS, first_out.read_text()[-2000:]
    assert f"every process stops at step {stopped[0]}" in second_err.read_text()
    assert processes.committed_steps(workdir)[-1] == stopped[0]

    _wait_all(_start_two(workdir, data_dir, tmp_path, "resumed"))
    assert STEPS in processes.committed_steps(workdir)

    config = tiny_config(f"train.steps={STEPS}", "model.num_layers=1")
    state, data_state = processes.restore(workdir, config, STEPS)
    expected_state, expected_data_state = processes.restore(reference, config, STEPS)
    assert data_state == expected_data_state  # the same batches, in the same order
    for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(expected_state), strict=True
    ):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        scale = max(float(np.max(np.abs(want))), 1e-30)
        np.testing.assert_allclose(
            got, want, rtol=0, atol=RELATIVE_TOLERANCE * scale, err_msg=jax.tree_util.keystr(path)
        )
    # The stop logged its own step too; every other logged step matches.
    losses, expected_losses = _train_losses(workdir), _train_losses(reference)
    assert losses.keys() - expected_losses.keys() <= {stopped[0]}
    logged = sorted(expected_losses)
    np.testing.assert_allclose(
        [losses[s] for s in logged], [expected_losses[s] for s in logged], rtol=1e-4
    )
