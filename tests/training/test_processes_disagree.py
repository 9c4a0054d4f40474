"""Two train.py processes on localhost (4 CPU devices each) that disagree, or where one of them
meets a fault the other does not: every process stops the same way, with one line that names
what differs, instead of waiting in a collective or aborting inside gloo."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import run_processes as processes

from moejax.training import workdir as workdir_lib

# Far above the few seconds these take: a hang (the heartbeat or barrier timeouts are 100 and
# 300 s) is what they catch, not slowness.
EXIT_WITHIN_S = 90.0
# train.steps of every run here: those that resume the finished run (`run`, at step 30) find
# it reached and train nothing.
STEPS = 20


def _finish(started, timeout: float = EXIT_WITHIN_S) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each process, which must all exit within `timeout`."""
    deadline = time.monotonic() + timeout
    results = []
    for process, out, err in started:
        try:
            status = process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other, _, _ in started:
                other.kill()
            raise
        results.append((status, out.read_text(), err.read_text()))
    return results


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line and not line.startswith("[Gloo]")]
    return lines[-1] if lines else ""


def _other_checkout(tmp_path: Path) -> Path:
    """A copy of train.py and the moejax and kernels_pallas sources with one file changed, as a
    host with another checkout has them; its train.py imports the copy."""
    root = tmp_path / "other_checkout"
    for package in ("moejax", "kernels_pallas"):
        shutil.copytree(
            processes.ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(processes.ROOT / "train.py", root / "train.py")
    with (root / "moejax" / "moe" / "dispatch.py").open("a") as source:
        source.write("\n# a line only this checkout has\n")
    return root


@pytest.mark.slow
def test_processes_with_different_configs_and_code_all_exit_2_before_building_anything(
    data_dir, tmp_path
):
    workdir = tmp_path / "run"
    command = processes.train_command(workdir, data_dir, STEPS)
    python, _, *arguments = command
    other = [python, str(_other_checkout(tmp_path) / "train.py"), *arguments]
    started = processes.start_distributed(
        [
            command,
            [*other, "--config.model.moe.num_experts=8", "--config.train.learning_rate=0.01"],
        ],
        tmp_path,
        "differ",
    )
    results = _finish(started)
    lines = set()
    for status, _, err in results:
        assert status == 2, err[-3000:]
        assert "model:" not in err  # the line logged once the state is built
        lines.add(_last_line(err))
    (line,) = lines  # the same line on both
    assert line.startswith(
        "distributed error: config differs between processes: model.moe.num_experts: "
        "process 0 has 4, process 1 has 8; train.learning_rate: process 0 has 0.003, process 1 "
        "has 0.01; code differs between processes: moejax/moe/dispatch.py: process 0 has '"
    ), line
    assert "Start every process with the same config file" in line
    assert "moejax/parallel/distributed.py" not in line  # the same file on both
    assert not workdir.exists()


@pytest.mark.slow
def test_a_data_dir_one_process_cannot_use_stops_every_process(data_dir, tmp_path):
    workdir = tmp_path / "run"
    not_a_directory = tmp_path / "not_a_directory"
    not_a_directory.write_text("")
    command = processes.train_command(workdir, data_dir, STEPS)
    started = processes.start_distributed(
        [command, [*command, f"--config.data.data_dir={not_a_directory}"]], tmp_path, "data_dir"
    )
    (status0, _, err0), (status1, _, err1) = _finish(started)
    assert (status0, status1) == (2, 2), err0[-3000:] + err1[-3000:]
    refusal = f"config error: data.data_dir='{not_a_directory}': {not_a_directory} is a file"
    assert _last_line(err1).startswith(refusal)
    assert _last_line(err0).startswith(
        f"distributed error: training start-up: process 1 stopped: {refusal}"
    )
    assert not workdir.exists()


@pytest.mark.slow
def test_a_workdir_lock_refused_to_process_0_stops_every_process(data_dir, tmp_path):
    workdir = tmp_path / "run"
    with workdir_lib.workdir_lock(workdir):  # held by this test's process
        command = processes.train_command(workdir, data_dir, STEPS)
        (status0, _, err0), (status1, _, err1) = _finish(
            processes.start_distributed([command, command], tmp_path, "locked")
        )
    assert (status0, status1) == (2, 2), err0[-3000:] + err1[-3000:]
    refusal = f"workdir error: --workdir {workdir}: another train.py is training there (pid "
    assert _last_line(err0).startswith(refusal)
    assert _last_line(err1).startswith(
        f"distributed error: workdir lock: process 0 stopped: {refusal}{os.getpid()}"
    )
    assert sorted(p.name for p in workdir.iterdir()) == [workdir_lib.LOCK_FILE]


@pytest.mark.slow
def test_a_data_iterator_one_process_drifted_is_not_saved_and_stops_every_process(
    run, data_dir, tmp_path
):
    """The finished run resumed for one step, its first save at that step."""
    command = processes.train_command(
        run, data_dir, 32, "train.warmup_steps=5", "train.checkpoint_every=1"
    )
    started = processes.start_distributed(
        [command, processes.with_fault(command, "data_ahead")], tmp_path, "drifted"
    )
    # It compiles and takes a step before its first save.
    for status, _, err in _finish(started, timeout=2 * EXIT_WITHIN_S):
        assert status == 2, err[-3000:]
        line = _last_line(err)
        assert line.startswith(
            "distributed error: data-iterator state differs between processes: "
        ), line
        assert "process 0 has" in line and "process 1 has" in line
        assert "Step 31 is not saved" in line
    assert processes.committed_steps(run) == [10, 20, 30]


@pytest.mark.slow
def test_a_checkpoint_one_process_cannot_read_is_skipped_by_every_process(run, data_dir, tmp_path):
    """The newest checkpoint (30) of a finished run fails to read on process 1 only: both
    resume from 20 (with nothing left to train), and process 0 moves 30 aside."""
    # The finished run's warmup: a different one would be a config change on resume.
    command = processes.train_command(run, data_dir, STEPS, "train.warmup_steps=5")
    started = processes.start_distributed(
        [command, processes.with_fault(command, "unreadable:30")], tmp_path, "unreadable"
    )
    (status0, out0, err0), (status1, _, err1) = _finish(started)
    assert (status0, status1) == (0, 0), err0[-3000:] + err1[-3000:]
    fault = "unreadable: OSError: injected fault: this host cannot read"
    assert f"checkpoint at step 30 is not usable ({fault}" in err1
    assert (
        "checkpoint at step 30 is not usable (not usable on another process (process 1: "
        f"{fault}" in err0
    )
    assert "resumed from step 20" in err0
    assert f"finished at step {STEPS}" in out0
    assert processes.committed_steps(run) == [10, 20]
    assert (run / workdir_lib.DAMAGED_DIR / "30" / "state").is_dir()


@pytest.mark.slow
def test_a_checkpoint_one_process_does_not_see_stops_every_process(run, data_dir, tmp_path):
    before = processes.snapshot(run / "checkpoints")
    command = processes.train_command(run, data_dir, STEPS, "train.warmup_steps=5")
    started = processes.start_distributed(
        [command, processes.with_fault(command, "unlisted:30")], tmp_path, "unlisted"
    )
    for status, _, err in _finish(started):
        assert status == 2, err[-3000:]
        assert _last_line(err).startswith(
            "distributed error: the checkpoint directory differs between processes: steps: "
            "process 0 has [10, 20, 30], process 1 has [10, 20]. Every process must see the "
            "same checkpoints"
        ), err[-3000:]
    assert processes.snapshot(run / "checkpoints") == before
    assert not (run / workdir_lib.DAMAGED_DIR).exists()


@pytest.mark.slow
def test_eval_processes_asked_for_different_steps_all_exit_2_before_reading(run, tmp_path):
    command = [sys.executable, str(processes.ROOT / "eval.py"), "--workdir", str(run)]
    started = processes.start_distributed(
        [[*command, "--step", "20"], [*command, "--step", "30"]], tmp_path, "eval"
    )
    for status, _, err in _finish(started):
        assert status == 2, err[-3000:]
        assert _last_line(err).startswith(
            "distributed error: command line differs between processes: --step: process 0 has "
            "20, process 1 has 30. Start every process with the same flags"
        ), err[-3000:]
    assert not (run / "eval").exists()
