"""Orbax checkpoints of the train state and the data-iterator state, saved together.

Saves are asynchronous and atomic (Orbax writes into a temporary directory and renames it
when the save is complete), so a crash mid-save leaves the previous checkpoints untouched.
Every reader goes through `restore_usable`: newest-first, past checkpoints that fail to read
or whose state the caller cannot use (a data-iterator state that does not apply), warning
about each. A read-only `Checkpointer` (evaluation) creates, cleans and deletes nothing.

With several processes every process calls every method at the same point (Orbax's saves are
collective): each writes and reads its own shards of the state into one shared directory, and
process 0 writes the data-iterator state, which must be the same on every process
(`data.pipeline`; a save checks it). The processes agree on what the directory holds and on
whether each checkpoint is usable (one whose shards fail to read on one process only is skipped
by all), so they never resume from different steps, and only process 0 moves damaged steps
aside. A disagreement they cannot resolve is a `DistributedError` on every process
(`moejax.parallel.distributed.Agreement`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from moejax.errors import UserError
from moejax.parallel import distributed

log = logging.getLogger(__name__)

STATE, DATA = "state", "data"


class CheckpointError(UserError):
    """No checkpoint can serve the request: the one asked for is damaged, or all are."""

    label = "checkpoint error"


@dataclasses.dataclass
class Restored:
    """A usable checkpoint: its step, train state, data-iterator state, what the caller's
    `usable` check returned, and the newer (or skipped) steps found damaged, with the reason."""

    step: int
    state: Any
    data_state: dict[str, Any]
    checked: Any
    damaged: dict[int, str]


class Checkpointer:
    """Keep-last-K checkpoint manager of `{"state": train state, "data": iterator state}`."""

    def __init__(
        self,
        directory: str | Path,
        *,
        keep: int,
        async_save: bool = True,
        read_only: bool = False,
    ):
        self.directory = Path(directory).absolute()
        self._keep, self._async, self._read_only = keep, async_save, read_only
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            # A reader deletes nothing, whatever the run keeps.
            max_to_keep=None if self._read_only else self._keep,
            save_interval_steps=0 if self._read_only else 1,
            enable_async_checkpointing=self._async,
            create=not self._read_only,
            read_only=self._read_only,
            # Only the process that holds the workdir lock may remove a half-written save.
            cleanup_tmp_directories=not self._read_only,
        )
        return ocp.CheckpointManager(self.directory, options=options, item_names=(STATE, DATA))

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict[str, Any] | None) -> None:
        """Starts an (async) save of `state` and the JSON-able `data_state` at `step`."""
        # Only process 0's copy is written: a process whose iterator had drifted would resume
        # on process 0's data without a trace.
        with distributed.Agreement(
            f"checkpoint {step}",
            remedy=f"Step {step} is not saved: resumed from it, the processes would read "
            "different data. Give every host the same code and the same corpus",
        ) as agreement:
            agreement.compare("data-iterator state", data_state or {})
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

    def is_committed(self, step: int) -> bool:
        """Whether the save of `step` is complete on disk (renamed out of its temporary name)."""
        self._manager.reload()
        return step in self._manager.all_steps() and (self.directory / str(step)).is_dir()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores `step` onto the shardings carried by `abstract_state`'s ShapeDtypeStructs.

        Each process reads its own shards and returns without waiting for the others (a read
        has no cross-process barrier here); callers agree on the outcome (`restore_usable`).
        """
        me = jax.process_index()
        # Orbax ends a restore with a barrier of all processes. A process whose read fails (a
        # shard only it reads is damaged) never reaches it, and the others wait there for ever,
        # or meet that process's next barrier under another name and fail on it.
        reader = ocp.Checkpointer(
            ocp.CompositeCheckpointHandler(),
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}
            ),
        )
        try:
            restored = reader.restore(
                self.directory / str(step),
                args=ocp.args.Composite(
                    **{
                        STATE: ocp.args.StandardRestore(abstract_state),
                        DATA: ocp.args.JsonRestore(),
                    }
                ),
            )
        finally:
            reader.close()
        return restored[STATE], restored[DATA]

    def _try(
        self, step: int, abstract_state: Any, usable: Callable[[int, Any, Any], Any] | None
    ) -> tuple[Restored | None, str]:
        restored, reason = self._try_here(step, abstract_state, usable)
        # A shard only one process reads may be the damaged one: every process must skip it.
        reasons = distributed.gather(f"checkpoint {step} usable", reason)
        if any(reasons):
            if restored is not None and restored.checked is not None:
                close = getattr(restored.checked, "close", None)
                if close is not None:
                    close()
            elsewhere = "; ".join(
                f"process {process}: {text}" for process, text in enumerate(reasons) if text
            )
            return None, reason or f"not usable on another process ({elsewhere})"
        return restored, ""

    def _try_here(
        self, step: int, abstract_state: Any, usable: Callable[[int, Any, Any], Any] | None
    ) -> tuple[Restored | None, str]:
        try:
            state, data_state = self.restore(step, abstract_state)
        except Exception as error:  # noqa: BLE001 - any read failure means a damaged step
            first_line = str(error).splitlines()[0][:200] if str(error) else ""
            return None, f"unreadable: {type(error).__name__}: {first_line}"
        try:
            checked = usable(step, state, data_state) if usable is not None else None
        except ValueError as error:
            return None, str(error)
        return Restored(step, state, data_state, checked, {}), ""

    def restore_usable(
        self,
        abstract_state: Any,
        *,
        step: int | None = None,
        before: int | None = None,
        usable: Callable[[int, Any, Any], Any] | None = None,
        asked_as: str = "--step",
    ) -> Restored | None:
        """The checkpoint to continue from or evaluate.

        With `step`, exactly that checkpoint: missing or damaged is a `CheckpointError`, never a
        substitution. Otherwise the newest usable one (older than `before`, if given), warning
        about each newer damaged one; None when there is none to try; a `CheckpointError` when
        every one is damaged. A checkpoint is usable when it restores onto `abstract_state` and
        `usable(step, state, data_state)` (if given) does not raise ValueError; its return value
        comes back as `Restored.checked`. `asked_as` names the flag `step` came from in
        messages.
        """
        available = self.all_steps()
        # Each process lists the directory itself. Where hosts do not share it (or see it late),
        # they would try different steps, each waiting for the others' verdict on its own.
        with distributed.Agreement(
            "checkpoint listing",
            remedy=f"Every process must see the same checkpoints: put {self.directory} on a "
            "filesystem that every host shares",
        ) as listing:
            listing.compare("the checkpoint directory", {"steps": available})
        if step is not None:
            if step not in available:
                raise CheckpointError(
                    f"{asked_as} {step}: no checkpoint at that step in {self.directory}; "
                    f"available: {available}"
                )
            restored, reason = self._try(step, abstract_state, usable)
            if restored is None:
                raise CheckpointError(
                    f"{asked_as} {step}: the checkpoint at step {step} in {self.directory} is "
                    f"damaged ({reason}); choose another of {available}, or leave {asked_as} out "
                    "to take the newest usable one"
                )
            return restored
        candidates = [s for s in reversed(available) if before is None or s < before]
        damaged: dict[int, str] = {}
        for candidate in candidates:
            restored, reason = self._try(candidate, abstract_state, usable)
            if restored is None:
                log.warning(
                    "checkpoint at step %d is not usable (%s); trying an older one",
                    candidate,
                    reason,
                )
                damaged[candidate] = reason
                continue
            restored.damaged = damaged
            return restored
        if damaged:
            listing = "; ".join(f"step {s}: {reason}" for s, reason in damaged.items())
            raise CheckpointError(
                f"no usable checkpoint in {self.directory}: every one is damaged ({listing}). "
                "Nothing was changed. Keep them for inspection and train in a new --workdir, or "
                "move them aside to start this run over. (When every data-iterator state fails "
                "to apply after a data.* change made with --allow_config_change, the change is "
                "the cause: undo it.)"
            )
        return None

    def quarantine(self, steps: list[int]) -> None:
        """Moves damaged step directories to `<checkpoints>_damaged/` (kept for inspection,
        never deleted or overwritten) so that training can save those step numbers again."""
        if not steps or self._read_only:
            return
        self._manager.close()
        if jax.process_index() == 0:
            self._move_aside(steps)
        distributed.barrier("moejax_checkpoint_quarantine")
        self._manager = self._open()

    def _move_aside(self, steps: list[int]) -> None:
        target = self.directory.parent / f"{self.directory.name}_damaged"
        target.mkdir(exist_ok=True)
        for step in steps:
            source = self.directory / str(step)
            if not source.exists():
                continue
            destination, copy = target / str(step), 0
            while destination.exists():
                copy += 1
                destination = target / f"{step}.{copy}"
            source.rename(destination)
            log.warning("moved damaged checkpoint %s to %s", source, destination)

    def close(self) -> None:
        if not self._read_only:
            self._manager.wait_until_finished()
        self._manager.close()
