"""Every input error of train.py and eval.py: one paragraph naming the file or field, the value
and what is allowed; exit status 2; no traceback; nothing in the workdir changed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import run_processes as processes

ROOT = Path(__file__).resolve().parents[2]


def _garbage_config_json(run: Path, tmp_path: Path) -> list[str]:
    (run / "config.json").write_text('{"model": {"d_model": 32,')
    return []


def _foreign_config_json(run: Path, tmp_path: Path) -> list[str]:
    (run / "config.json").write_text('{"model": {"experts": 4}}')
    return []


def _mistyped_config_json(run: Path, tmp_path: Path) -> list[str]:
    saved = json.loads((run / "config.json").read_text())
    saved["model"]["d_model"] = "thirty-two"
    (run / "config.json").write_text(json.dumps(saved))
    return []


def _file_workdir(run: Path, tmp_path: Path) -> list[str]:
    path = tmp_path / "a_file"
    path.write_text("not a directory\n")
    return ["--workdir", str(path)]


def _file_data_dir(run: Path, tmp_path: Path) -> list[str]:
    path = tmp_path / "data_file"
    path.write_text("not a directory\n")
    # Allowed to change data, so that the data directory itself is what fails.
    return [f"--config.data.data_dir={path}", "--allow_config_change"]


def _file_data_dir_new_workdir(run: Path, tmp_path: Path) -> list[str]:
    return [*_file_data_dir(run, tmp_path), "--workdir", str(tmp_path / "new_run")]


def _config_file(text: str):
    def make(run: Path, tmp_path: Path) -> list[str]:
        path = tmp_path / "broken_config.py"
        path.write_text(text)
        return ["--config", str(path)]

    return make


def _assert_refused(status: int, capsys, expected: list[str], run: Path, before: dict) -> None:
    """Exit status 2, every expected text in one message without a traceback, `run` as it was."""
    err = capsys.readouterr().err
    assert status == 2, err
    for text in expected:
        assert text in err, err
    assert "Traceback" not in err
    assert processes.snapshot(run) == before


# (name, extra argv or a function (run, tmp_path) -> extra argv, substrings of the message)
TRAIN_CASES = [
    ("syntax error", _config_file("def get_config(:\n    pass\n"), ["broken_config.py", "line 1"]),
    (
        "config raises",
        _config_file("import math\n\n\ndef get_config():\n    return 1 / 0\n"),
        ["get_config()", "ZeroDivisionError", "line 5"],
    ),
    (
        "unknown task",
        _config_file('TASK = "lotery"\n\n\ndef get_config():\n    return None\n'),
        ["broken_config.py", "TASK='lotery'", "'lottery'"],
    ),
    (
        # The task is what the file declares, never guessed from what get_config() returns.
        "lottery config without its TASK",
        _config_file(
            "from moejax.tasks.lottery import LotteryConfig\n\n\n"
            "def get_config():\n    return LotteryConfig()\n"
        ),
        ["broken_config.py", "LotteryConfig", "runs on a Config"],
    ),
    ("override without value", ["--config.train.steps"], ["--config.train.steps", "missing"]),
    ("workdir is a file", _file_workdir, ["a_file", "not a directory"]),
    ("data_dir is a file", _file_data_dir, ["data.data_dir", "data_file", "not a directory"]),
    (
        "data_dir is a file, new workdir",
        _file_data_dir_new_workdir,
        ["data.data_dir", "data_file", "not a directory"],
    ),
    ("garbage config.json", _garbage_config_json, ["config.json", "not a readable moejax config"]),
    ("foreign config.json", _foreign_config_json, ["config.json", "experts"]),
    (
        "mistyped config.json",
        _mistyped_config_json,
        ["config.json", "model.d_model: value 'thirty-two' is not of type int"],
    ),
    (
        "other model shape",
        ["--config.model.moe.num_experts=8", "--config.model.d_model=64"],
        [
            "model.d_model: run has 32, you asked for 64",
            "model.moe.num_experts: run has 4, you asked for 8",
        ],
    ),
    (
        "other batch size",
        ["--config.data.global_batch_size=16"],
        ["data.global_batch_size: run has 8, you asked for 16", "--allow_config_change"],
    ),
    (
        "pruning switched on",
        ["--config.pruning.method.name=masked"],
        ["pruning.method.name: run has 'none', you asked for 'masked'"],
    ),
    ("bad value", ["--config.model.moe.top_k=9"], ["model.moe.top_k"]),
]


@pytest.mark.parametrize("name, arguments, expected", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_input_errors_exit_2_with_one_message_and_leave_the_workdir_alone(
    name, arguments, expected, run, tmp_path, data_dir, capsys
):
    extra = arguments(run, tmp_path) if callable(arguments) else arguments
    before = processes.snapshot(run)
    argv = [
        "--config",
        str(ROOT / "configs/tiny.py"),
        "--workdir",
        str(run),
        "--no-progress",
        f"--config.data.data_dir={data_dir}",
        "--config.train.steps=30",
        *extra,
    ]
    _assert_refused(processes.cli_module("train").main(argv), capsys, expected, run, before)
    assert not (tmp_path / "new_run").exists()


def _damage_step(run: Path, step: int) -> None:
    for path in (run / "checkpoints" / str(step)).rglob("*"):
        if path.is_file() and path.stat().st_size > 0:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


EVAL_CASES = [
    ("garbage config.json", _garbage_config_json, ["config.json", "not a readable"]),
    ("mistyped config.json", _mistyped_config_json, ["config.json", "model.d_model"]),
    ("missing step", ["--step", "15"], ["--step 15", "available: [10, 20, 30]"]),
    ("negative step", ["--step", "-1"], ["--step", "negative"]),
    ("missing compare step", ["--compare_step", "25"], ["--compare_step 25", "no checkpoint"]),
    ("workdir is a file", _file_workdir, ["a_file", "not a directory"]),
    ("model override", ["--config.model.moe.num_experts=8"], ["only mesh.*"]),
    (
        "damaged step",
        lambda run, tmp_path: _damage_step(run, 20) or ["--step", "20"],
        ["--step 20", "damaged"],
    ),
    (
        "damaged compare step",
        lambda run, tmp_path: _damage_step(run, 20) or ["--compare_step", "20"],
        ["--compare_step 20", "damaged"],
    ),
]


@pytest.mark.parametrize("name, arguments, expected", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_eval_input_errors_exit_2_with_one_message_and_leave_the_workdir_alone(
    name, arguments, expected, run, tmp_path, capsys
):
    extra = arguments(run, tmp_path) if callable(arguments) else arguments
    before = processes.snapshot(run)
    argv = ["--workdir", str(run), "--sample_bytes", "0", *extra]
    _assert_refused(processes.cli_module("eval").main(argv), capsys, expected, run, before)


def test_the_exit_status_is_2_in_a_real_process_and_debug_shows_the_traceback(tmp_path):
    config = tmp_path / "broken.py"
    config.write_text("def get_config():\n    raise RuntimeError('no such experiment')\n")
    command = [sys.executable, str(ROOT / "train.py"), "--config", str(config)]
    command += ["--workdir", str(tmp_path / "run")]
    quiet = subprocess.run(command, env=processes.env(), capture_output=True, text=True)
    assert quiet.returncode == 2
    assert "RuntimeError: no such experiment (line 2)" in quiet.stderr
    assert "Traceback" not in quiet.stderr
    loud = subprocess.run(
        [*command, "--debug"], env=processes.env(), capture_output=True, text=True
    )
    assert loud.returncode == 1 and "Traceback" in loud.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture
def read_only_view(run, tmp_path):
    """`run` seen through a read-only path: a read-only bind mount as root (root writes through
    any permission bits), the permission bits otherwise."""
    if os.geteuid() != 0:
        items = [run, *run.rglob("*")]
        for item in items:
            item.chmod(item.stat().st_mode & ~0o222)
        yield run
        for item in items:
            item.chmod(item.stat().st_mode | 0o200)
        return
    view = tmp_path / "read_only_run"
    view.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(run), str(view)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mounted.stderr!r}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
        yield view
    finally:
        subprocess.run(["umount", str(view)], check=True)


def test_a_read_only_workdir_is_an_input_error(read_only_view, data_dir, capsys):
    before = processes.snapshot(read_only_view)
    argv = ["--config", str(ROOT / "configs/tiny.py"), "--workdir", str(read_only_view)]
    argv += ["--no-progress", f"--config.data.data_dir={data_dir}", "--config.train.steps=40"]
    status = processes.cli_module("train").main(argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert f"--workdir {read_only_view}: cannot write there" in err
    assert "Traceback" not in err
    assert processes.snapshot(read_only_view) == before
