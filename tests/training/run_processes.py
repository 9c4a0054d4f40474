"""train.py / eval.py as subprocesses, the way a user or a cluster scheduler drives them, or as
modules whose `main(argv)` runs in the test's process."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from moejax import config as config_lib
from moejax.parallel import sharding
from moejax.training import state as state_lib
from moejax.training.checkpoint import Checkpointer

ROOT = Path(__file__).resolve().parents[2]


def env(devices: int = 1) -> dict[str, str]:
    """`devices` CPU devices (by default one, so a subprocess's run matches a 1-device run in
    any other process)."""
    variables = dict(os.environ)
    variables["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    variables["JAX_PLATFORMS"] = "cpu"
    # Lines reach the log files as they are printed, so a test can act on one while it runs.
    variables["PYTHONUNBUFFERED"] = "1"
    return variables


def cli_module(name: str):
    """`train.py` or `eval.py` (`name` "train" / "eval") as a module, to call its `main(argv)`."""
    spec = importlib.util.spec_from_file_location(f"moejax_{name}_cli", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_command(workdir: Path, data_dir: Path, steps: int, *overrides: str) -> list[str]:
    """train.py on configs/tiny.py; `overrides` are `group.field=value` strings."""
    defaults = {
        "train.checkpoint_every": "10",
        "train.eval_every": str(steps),
        "train.log_every": "10",
        "train.warmup_steps": "10",
    }
    for override in overrides:
        name, value = override.split("=", 1)
        defaults[name] = value
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
        *(f"--config.{name}={value}" for name, value in defaults.items()),
    ]


def free_port() -> int:
    """A localhost TCP port free at the moment of asking (for a jax.distributed coordinator)."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def start(
    command: list[str],
    log_dir: Path,
    name: str,
    devices: int = 1,
    environ: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, Path, Path]:
    """Starts `command` on `devices` CPU devices, with `environ` added to the environment, and
    stdout and stderr in files under `log_dir` (read while it runs)."""
    stdout, stderr = log_dir / f"{name}.out", log_dir / f"{name}.err"
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(
            command, env=env(devices) | (environ or {}), stdout=out, stderr=err
        )
    return process, stdout, stderr


def start_distributed(
    commands: list[list[str]],
    log_dir: Path,
    name: str,
    devices: int = 4,
    environ: list[dict[str, str] | None] | None = None,
) -> list[tuple[subprocess.Popen, Path, Path]]:
    """Starts `commands[i]` as process i of one distributed run on localhost (`devices` CPU
    devices each, `environ[i]` added to its environment), logs under `log_dir` as
    `{name}{i}.out` / `.err`."""
    port = free_port()
    started = []
    for process_id, command in enumerate(commands):
        flags = [f"--coordinator_address=localhost:{port}", f"--num_processes={len(commands)}"]
        started.append(
            start(
                [*command, *flags, f"--process_id={process_id}"],
                log_dir,
                f"{name}{process_id}",
                devices=devices,
                environ=(environ or [None] * len(commands))[process_id],
            )
        )
    return started


def with_fault(command: list[str], fault: str) -> list[str]:
    """`command` (a `train_command`) run through one_process_fault.py with `fault` injected."""
    python, _, *arguments = command
    return [python, str(Path(__file__).with_name("one_process_fault.py")), fault, *arguments]


def wait_for_text(process: subprocess.Popen, path: Path, text: str, timeout: float = 180.0) -> bool:
    """Waits until `text` is in the file at `path`; False if the process exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return True
        if process.poll() is not None:
            return text in path.read_text()
        time.sleep(0.01)
    raise AssertionError(f"{text!r} did not appear in {path} within {timeout} s")


def committed_steps(workdir: Path) -> list[int]:
    """Step directories Orbax has finished (renamed out of their temporary names)."""
    directory = workdir / "checkpoints"
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def restore(workdir: Path, config, step: int):
    """(train state, data-iterator state) of `workdir`'s checkpoint at `step`, on one device."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, jax.devices()[:1])
    layout = state_lib.state_layout(config, mesh)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=3, async_save=False, read_only=True)
    try:
        return checkpointer.restore(step, layout.restore_target())
    finally:
        checkpointer.close()


def assert_same_checkpoint(a: Path, b: Path, config, step: int) -> None:
    """The two workdirs' checkpoints at `step` are bit-identical (state and data order)."""
    state_a, data_a = restore(a, config, step)
    state_b, data_b = restore(b, config, step)
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert data_a == data_b


def metric_steps(workdir: Path) -> list[tuple[int, str]]:
    """(step, split) of every line of `workdir/metrics.jsonl`, in file order."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [(json.loads(line)["step"], json.loads(line)["split"]) for line in lines]


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every path under `directory` with its bytes (None for directories)."""
    if not directory.exists():
        return {}
    return {
        str(path.relative_to(directory)): (path.read_bytes() if path.is_file() else None)
        for path in sorted(directory.rglob("*"))
    }


def finished_run_config(data_dir: Path) -> config_lib.Config:
    """configs/tiny.py for 30 steps: checkpoints at 10, 20 and 30."""
    config = config_lib.load_config_file(ROOT / "configs" / "tiny.py")
    return config_lib.apply_overrides(config, [f"data.data_dir={data_dir}", "train.steps=30"])
