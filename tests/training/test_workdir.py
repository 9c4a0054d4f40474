"""The workdir's rules: the lock, config.json against a resumed config, the metrics log."""

import json
import os
import shutil
import struct
from pathlib import Path

import jax
import pytest
import run_processes as processes
from tensorboardX.proto import event_pb2

from moejax import config as config_lib
from moejax.training import workdir as workdir_lib
from moejax.training.loop import train
from moejax.training.workdir import WorkdirError

ROOT = Path(__file__).resolve().parents[2]


def _tiny(*overrides: str) -> config_lib.Config:
    return config_lib.apply_overrides(
        config_lib.load_config_file(ROOT / "configs/tiny.py"), list(overrides)
    )


@pytest.fixture
def recorded(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    workdir_lib.write_config(workdir, _tiny())
    return workdir


def test_free_fields_and_the_mesh_may_change_on_resume(recorded):
    requested = _tiny("train.steps=500", "train.eval_every=3", "mesh.data=2", "mesh.expert=2")
    assert workdir_lib.check_resume(recorded, requested) == _tiny()


def test_where_the_experts_run_may_change_on_resume(recorded):
    # LLEP computes what plain expert parallelism and dropless do: a preempted run may turn it
    # on (with expert shards), or move between any strategies that drop nothing.
    requested = _tiny(
        "mesh.expert=2",
        "model.moe.dispatch.name=llep",
        "model.moe.dispatch.options.margin=0.2",
        "model.moe.dispatch.options.max_foreign=3",
        "model.moe.dispatch.options.gmm_impl=xla",
    )
    workdir_lib.check_resume(recorded, requested)
    workdir_lib.check_resume(recorded, _tiny("model.moe.dispatch.name=expert_parallel"))
    # Capacity drops assignments: a different function of the same parameters.
    with pytest.raises(WorkdirError, match="model.moe.dispatch.name"):
        workdir_lib.check_resume(recorded, _tiny("model.moe.dispatch.name=capacity"))
    with pytest.raises(WorkdirError, match="model.moe.num_experts"):
        workdir_lib.check_resume(recorded, _tiny("model.moe.num_experts=8"))


def test_a_model_change_names_every_field_and_no_flag_allows_it(recorded):
    requested = _tiny("model.moe.num_experts=8", "attention.kind=local", "train.learning_rate=1.0")
    for allow in (False, True):
        with pytest.raises(WorkdirError) as error:
            workdir_lib.check_resume(recorded, requested, allow_config_change=allow)
        message = str(error.value)
        assert "model.moe.num_experts: run has 4, you asked for 8" in message
        assert "attention.kind: run has 'dense', you asked for 'local'" in message
        # The first problem to fix is the model; the optimiser change is not mixed in.
        assert "learning_rate" not in message


@pytest.mark.parametrize(
    "override",
    ["data.global_batch_size=16", "data.shuffle_seed=1", "data.num_workers=2", "train.seed=3"],
)
def test_data_and_optimiser_changes_need_the_flag(recorded, override):
    with pytest.raises(WorkdirError, match="--allow_config_change"):
        workdir_lib.check_resume(recorded, _tiny(override))
    workdir_lib.check_resume(recorded, _tiny(override), allow_config_change=True)


def test_config_json_is_replaced_whole(tmp_path):
    workdir_lib.write_config(tmp_path, _tiny())
    workdir_lib.write_config(tmp_path, _tiny("train.steps=7"))
    assert config_lib.load_json(tmp_path / "config.json") == _tiny("train.steps=7")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_trim_metrics_keeps_the_lines_through_a_step_and_drops_a_torn_one(tmp_path):
    lines = [{"step": s, "split": "train"} for s in (5, 10, 15, 20)] + [{"step": 10, "split": "e"}]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 25, "spl'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert workdir_lib.trim_metrics(tmp_path, 10) == 3
    assert processes.metric_steps(tmp_path) == [(5, "train"), (10, "train"), (10, "e")]
    assert workdir_lib.trim_metrics(tmp_path, None) == 3
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_a_held_lock_names_its_holder_and_a_dead_ones_lock_is_taken(tmp_path):
    workdir = tmp_path / "run"
    with workdir_lib.workdir_lock(workdir) as lock_file:
        holder = json.loads(lock_file.read_text())
        assert holder["pid"] == os.getpid()
        with (
            pytest.raises(WorkdirError, match=f"pid {os.getpid()} on host {holder['host']}"),
            workdir_lib.workdir_lock(workdir),
        ):
            pass
    assert lock_file.read_text() == ""
    # What a process killed with SIGKILL leaves: its record, and no lock (the kernel dropped it).
    lock_file.write_text(json.dumps({"pid": 2**22 + 1, "host": "gone", "started": "then"}))
    with workdir_lib.workdir_lock(workdir):
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()


def test_a_resume_with_lost_saves_logs_each_step_once(finished_run, tmp_path, data_dir):
    """The saves of steps 20 and 30 never committed (a crash): the log lines written past step
    10 are dropped on resume and written again, once."""
    # The session's finished run: configs/tiny.py for 30 steps, logged every 5 steps.
    config = processes.finished_run_config(data_dir)
    assert config.train.log_every == 5
    straight, crashed = finished_run, tmp_path / "crashed"
    shutil.copytree(straight, crashed)
    for step in (20, 30):
        shutil.rmtree(crashed / "checkpoints" / str(step))
    result = train(config, crashed, devices=jax.devices()[:1], progress=False)
    assert result.restored_from == 10
    assert processes.metric_steps(crashed) == processes.metric_steps(straight)
    processes.assert_same_checkpoint(straight, crashed, config, 30)
    # TensorBoard is told to hide the first attempt's events from step 11 on.
    assert _purge_steps(straight / "tensorboard") == []
    assert _purge_steps(crashed / "tensorboard") == [11]


def _purge_steps(directory: Path) -> list[int]:
    """Steps of the session-start events in the TFRecord event files under `directory`."""
    steps = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            if event.session_log.status == event_pb2.SessionLog.START:
                steps.append(event.step)
    return steps


def test_allow_config_change_continues_with_the_new_values_and_records_them(run, data_dir):
    workdir = run  # the session's finished run, 30 steps
    config = processes.finished_run_config(data_dir)
    bigger = config_lib.apply_overrides(config, ["train.steps=40", "data.global_batch_size=16"])
    with pytest.raises(WorkdirError, match="data.global_batch_size: run has 8, you asked for 16"):
        train(bigger, workdir, devices=jax.devices()[:1], progress=False)
    assert config_lib.load_json(workdir / "config.json") == config
    result = train(
        bigger, workdir, devices=jax.devices()[:1], progress=False, allow_config_change=True
    )
    assert result.restored_from == 30 and result.step == 40
    assert config_lib.load_json(workdir / "config.json") == bigger
