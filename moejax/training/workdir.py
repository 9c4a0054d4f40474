"""A run directory and the rules that keep it whole.

- One `train.py` at a time: `WorkdirLock` holds an exclusive `flock` on `train.lock` while a
  run trains; the kernel drops it when the process dies, so a lock left by a crash is free
  again, and the file names the holder (pid, host) for the refusal message.
- `config.json` is the run's record: `check_resume` compares a requested config against it
  field by field before anything is written, and `write_config` replaces it atomically, once
  the run has restored or initialised its state.
- `metrics.jsonl` holds each step once: `trim_metrics` drops the lines a resumed run is about
  to write again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from moejax import config as config_lib
from moejax.config import Config
from moejax.errors import UserError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints_damaged"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = "train.lock"

# Fields a resumed run may change freely: how often it logs and saves, how long it runs, how
# it evaluates and over which devices. None of them changes the state or the data order.
FREE_ON_RESUME = frozenset(
    {
        "train.steps",
        "train.log_every",
        "train.eval_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.async_checkpointing",
        "data.eval_batches",
        "data.eval_batch_size",
        "model.moe.halting_threshold",
        # How the expert FFNs run, not what they compute.
        "model.moe.dispatch.options.gmm_impl",
        "model.moe.dispatch.options.exchange",
        # LLEP's outputs are plain expert parallelism's whatever its load cap.
        "model.moe.dispatch.options.margin",
        "model.moe.dispatch.options.max_foreign",
    }
)
# Groups that define the trained state (parameter shapes, optimizer and mask state): a run
# cannot change them, with or without --allow_config_change.
STATE_GROUPS = ("model", "attention", "pruning")


class WorkdirError(UserError):
    """A workdir that cannot be used as asked; the message names it and says what to do."""

    label = "workdir error"


def config_changes(saved: Config, requested: Config) -> list[tuple[str, Any, Any]]:
    """`(path, saved value, requested value)` for every field that differs, in order; a path
    only one of them has (another router's options) is compared with None."""
    before, after = config_lib.flat_fields(saved), config_lib.flat_fields(requested)
    names = list(before) + [name for name in after if name not in before]
    return [
        (name, before.get(name), after.get(name))
        for name in names
        if before.get(name) != after.get(name)
    ]


def _describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(
        f"{name}: run has {old!r}, you asked for {new!r}" for name, old, new in changes
    )


def read_run_config(workdir: Path) -> Config | None:
    """The config recorded in `workdir/config.json`, None if there is none; a file that is not
    a readable moejax config is a `WorkdirError` naming it."""
    path = workdir / CONFIG_FILE
    if not path.exists():
        return None
    try:
        return config_lib.load_json(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise WorkdirError(
            f"{path}: not a readable moejax config ({type(error).__name__}: {reason}). It is the "
            "record of the run in this workdir; restore it from the run's first lines of output "
            "or a backup, or train in a new --workdir."
        ) from None


def check_workdir_path(workdir: Path) -> None:
    """Refuses a `--workdir` that exists and is not a directory."""
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(
            f"--workdir {workdir}: exists and is not a directory; give a directory (new or a "
            "run's)."
        )


def check_resume(
    workdir: Path, requested: Config, *, allow_config_change: bool = False
) -> Config | None:
    """Checks that `requested` may continue the run recorded in `workdir` (if any); returns the
    recorded config. Writes nothing.

    Fields in `FREE_ON_RESUME` and `mesh.*` may differ, and the dispatch strategy among those
    that drop nothing (`DispatchSpec.drops`). The model, attention and pruning groups
    define the checkpointed state and never may. Any other change (batch size, data, optimiser)
    would silently make the run a different one, so it needs `allow_config_change`.
    """
    check_workdir_path(workdir)
    saved = read_run_config(workdir)
    if saved is None:
        return None
    # Strategies that never drop an assignment compute the same function: a run may move
    # between them (to "expert_parallel" with a larger mesh.expert, say).
    same_dispatch = not (
        saved.model.moe.dispatch.spec.drops or requested.model.moe.dispatch.spec.drops
    )
    changes = [
        change
        for change in config_changes(saved, requested)
        if change[0] not in FREE_ON_RESUME
        and not change[0].startswith("mesh.")
        and not (same_dispatch and change[0] == "model.moe.dispatch.name")
    ]
    structural = [change for change in changes if change[0].split(".")[0] in STATE_GROUPS]
    if structural:
        raise WorkdirError(
            f"--workdir {workdir}: holds a run of a different model: "
            f"{_describe_changes(structural)}. Its checkpoints cannot hold that state; use a new "
            "--workdir, or ask for the run's values."
        )
    if changes and not allow_config_change:
        raise WorkdirError(
            f"--workdir {workdir}: resuming with a changed config: {_describe_changes(changes)}. "
            "That would continue the run as a different one; ask for the run's values, use a new "
            "--workdir, or pass --allow_config_change to continue with the new values."
        )
    return saved


def _write_atomically(path: Path, text: str) -> None:
    """Replaces `path` by `text` so that a reader, or a crash, sees the old file or the new one."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with temporary.open("w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def write_config(workdir: Path, config: Config) -> None:
    """Records `config` as the run's `config.json`, atomically."""
    _write_atomically(workdir / CONFIG_FILE, config_lib.to_json(config))


def trim_metrics(workdir: Path, keep_through_step: int | None) -> int:
    """Drops the `metrics.jsonl` lines after `keep_through_step` (all of them for None: the run
    starts from scratch), atomically; returns how many lines were dropped.

    A run writes a step's lines before it saves that step, so the lines after the restored
    checkpoint are the ones the resumed run writes again. A torn last line (a crash mid-write)
    is dropped too.
    """
    path = workdir / METRICS_FILE
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            step = int(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            dropped += 1
            continue
        if keep_through_step is not None and step <= keep_through_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        _write_atomically(path, "".join(line + "\n" for line in kept))
    return dropped


@dataclasses.dataclass(frozen=True)
class LockHolder:
    pid: int
    host: str
    started: str


def _read_holder(path: Path) -> LockHolder | None:
    try:
        return LockHolder(**json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError):
        return None


def _unwritable(workdir: Path, error: OSError) -> WorkdirError:
    return WorkdirError(
        f"--workdir {workdir}: cannot write there ({error.strerror or error}); training needs a "
        "writable directory for its checkpoints and logs: choose another --workdir or fix its "
        "permissions."
    )


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[Path]:
    """Creates `workdir` if needed and holds its exclusive training lock inside the block.

    Raises `WorkdirError` naming the holder when another process trains there, or when the
    workdir cannot be written.
    """
    check_workdir_path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise _unwritable(workdir, error) from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(workdir / LOCK_FILE)
            who = (
                f"pid {holder.pid} on host {holder.host}, training since {holder.started}"
                if holder
                else "a process that has not yet written its name"
            )
            raise WorkdirError(
                f"--workdir {workdir}: another train.py is training there ({who}). Two runs in "
                "one workdir would delete each other's checkpoints. Wait for it to finish, stop "
                "it (SIGTERM saves a checkpoint and exits), or use another --workdir."
            ) from None
        holder = LockHolder(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        )
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(dataclasses.asdict(holder)).encode(), 0)
        try:
            yield workdir / LOCK_FILE
        finally:
            # Empty, so that a reader never takes a finished run for a live holder.
            os.ftruncate(descriptor, 0)
    finally:
        # Closing the descriptor releases the lock (and so does the process dying).
        os.close(descriptor)
