"""Damaged checkpoints: every reader falls back to the newest usable one, and nothing is lost."""

import shutil
from pathlib import Path

import jax
import pytest
import run_processes as processes

from moejax.evaluation import evaluate_workdir
from moejax.training.checkpoint import Checkpointer, CheckpointError
from moejax.training.loop import train
from moejax.training.restore import restore_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def config(data_dir):
    return processes.finished_run_config(data_dir)


def _truncate(run: Path, step: int) -> None:
    for path in (run / "checkpoints" / str(step)).rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty_iterator_state(run: Path, step: int) -> None:
    (run / "checkpoints" / str(step) / "data" / "metadata").write_text("{}")


def _eval(run: Path, **kwargs):
    return evaluate_workdir(run, devices=jax.devices()[:1], **kwargs)


def test_a_damaged_second_newest_checkpoint_moves_the_comparison_back(run):
    _truncate(run, 20)
    results = _eval(run)
    assert results["step"] == 30 and results["compare_step"] == 10
    assert 0.0 <= results["moe/layer0/routing_fluctuation"] <= 1.0
    # Only the comparison was missing: the evaluated checkpoint is the newest one.
    assert results["damaged_steps"] == []


def test_an_iterator_state_that_does_not_apply_makes_a_checkpoint_unusable(run, config, caplog):
    _empty_iterator_state(run, 30)
    results = _eval(run)
    assert results["step"] == 20 and results["damaged_steps"] == [30]
    assert "checkpoint at step 30 is not usable (its data-iterator state does not apply" in (
        caplog.text
    )
    assert restore_run(run)[1] == 20

    result = train(config, run, devices=jax.devices()[:1], progress=False)
    assert result.restored_from == 20 and result.step == 30
    assert (run / "checkpoints_damaged" / "30" / "data" / "metadata").read_text() == "{}"
    assert processes.committed_steps(run) == [10, 20, 30]


def test_a_damaged_step_asked_for_is_an_error_not_a_substitution(run):
    _empty_iterator_state(run, 20)
    with pytest.raises(CheckpointError, match=r"--step 20: the checkpoint at step 20 .* damaged"):
        _eval(run, step=20)
    with pytest.raises(CheckpointError, match=r"--compare_step 20: .* damaged"):
        _eval(run, compare_step=20)
    assert _eval(run, step=10)["step"] == 10


def test_every_checkpoint_damaged_is_an_error_that_changes_nothing(run, config):
    for step in (10, 20, 30):
        _truncate(run, step)
    before = processes.snapshot(run)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .* every one is damaged"):
        train(config, run, devices=jax.devices()[:1], progress=False)
    with pytest.raises(CheckpointError, match=r"every one is damaged \(step 30: unreadable"):
        _eval(run)
    # The lock file's holder record is cleared again; nothing else may differ.
    assert processes.snapshot(run) == before


def test_quarantining_a_step_twice_keeps_both(run):
    checkpointer = Checkpointer(run / "checkpoints", keep=3, async_save=False)
    try:
        (run / "checkpoints" / "30" / "first").write_text("first damage\n")
        checkpointer.quarantine([30])
        shutil.copytree(run / "checkpoints" / "20", run / "checkpoints" / "30")
        (run / "checkpoints" / "30" / "second").write_text("second damage\n")
        checkpointer.quarantine([30])
    finally:
        checkpointer.close()
    damaged = run / "checkpoints_damaged"
    assert (damaged / "30" / "first").read_text() == "first damage\n"
    assert (damaged / "30.1" / "second").read_text() == "second damage\n"


def test_eval_creates_and_deletes_nothing_under_checkpoints(run):
    # A save in flight of a run that is still training, as eval may see it.
    in_flight = run / "checkpoints" / "40.orbax-checkpoint-tmp-1234"
    shutil.copytree(run / "checkpoints" / "30", in_flight)
    _truncate(run, 30)
    before = processes.snapshot(run / "checkpoints")
    eval_cli = processes.cli_module("eval")
    assert eval_cli.main(["--workdir", str(run), "--sample_bytes", "0"]) == 0
    assert processes.snapshot(run / "checkpoints") == before
    assert not (run / "checkpoints_damaged").exists()
    assert (run / "eval" / "step_20.json").exists()
