"""Orbax checkpoints of the train state and the data-iterator state, saved together.

Saves are asynchronous and atomic (Orbax writes into a temporary directory and renames it
when the save is complete), so a crash mid-save leaves the previous checkpoints untouched.
Restore goes newest-first and falls back past checkpoints that fail to read (truncated or
missing files), warning about each.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

STATE, DATA = "state", "data"


class Checkpointer:
    """Keep-last-K checkpoint manager of `{"state": train state, "data": iterator state}`."""

    def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self._keep, self._async = keep, async_save
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self._keep,
            enable_async_checkpointing=self._async,
            create=True,
            cleanup_tmp_directories=True,
        )
        return ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA))

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict[str, Any] | None) -> None:
        """Starts an (async) save of `state` and the JSON-able `data_state` at `step`."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardSave(state), DATA: ocp.args.JsonSave(data_state or {})}
            ),
            force=True,
        )

    def wait(self) -> None:
        """Blocks until the pending async save is on disk."""
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores `step` onto the shardings carried by `abstract_state`'s ShapeDtypeStructs."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                **{STATE: ocp.args.StandardRestore(abstract_state), DATA: ocp.args.JsonRestore()}
            ),
        )
        return restored[STATE], restored[DATA]

    def restore_latest_good(
        self, abstract_state: Any, *, step: int | None = None
    ) -> tuple[int, Any, dict[str, Any], list[int]] | None:
        """Restores the newest readable checkpoint at or before `step` (default: the latest).

        Returns (step, state, data_state, damaged_steps) or None when no checkpoint exists;
        raises if checkpoints exist but none can be read.
        """
        candidates = [s for s in reversed(self.all_steps()) if step is None or s <= step]
        damaged = []
        for candidate in candidates:
            try:
                state, data_state = self.restore(candidate, abstract_state)
            except Exception as error:  # noqa: BLE001 - any read failure means a damaged step
                log.warning(
                    "checkpoint at step %d is unreadable (%s: %s); trying an older one",
                    candidate,
                    type(error).__name__,
                    str(error).splitlines()[0][:200],
                )
                damaged.append(candidate)
                continue
            return candidate, state, data_state, damaged
        if damaged:
            raise RuntimeError(
                f"no readable checkpoint in {self.directory}: steps {damaged} are all damaged"
            )
        return None

    def quarantine(self, steps: list[int]) -> None:
        """Moves damaged step directories aside (kept for inspection, never deleted) so that
        training can save those step numbers again."""
        if not steps:
            return
        self._manager.close()
        target = self.directory.parent / f"{self.directory.name}_damaged"
        target.mkdir(exist_ok=True)
        for step in steps:
            source = self.directory / str(step)
            if source.exists():
                destination = target / str(step)
                if destination.exists():
                    shutil.rmtree(destination)
                source.rename(destination)
                log.warning("moved damaged checkpoint %s to %s", source, destination)
        self._manager = self._open()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
