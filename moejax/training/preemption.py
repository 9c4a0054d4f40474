"""Stop requests: SIGTERM / SIGINT in one process, JAX's preemption sync point across several.

A signal only sets a flag; the training loop asks `should_stop(step)` once per step boundary,
then saves that step and waits for the save before it returns. Handlers stay installed until
the run has closed its checkpoints, so a second signal during the final save is noted and
cannot abort it.

With several processes (`jax.distributed`), each must stop at the same step or the save's
collectives hang: the stop then comes from `reached_preemption(step)` (Orbax over JAX's
preemption sync manager, which owns SIGTERM and agrees a step across processes), and this
class leaves the signals to it.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable

import jax

log = logging.getLogger(__name__)


class StopRequest:
    """Context manager turning stop signals into a flag read between steps."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopRequest:
        # Asked without starting a backend, so that the handlers can go in before anything slow.
        # Several processes: a signal one process alone saw must not make it stop alone.
        signals = () if jax.distributed.is_initialized() else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            # Outside the main thread signals stay with the caller.
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name = name
        else:
            log.warning(
                "%s received while stopping: the checkpoint being saved finishes first", name
            )

    def should_stop(self, step: int, reached_preemption: Callable[[int], bool]) -> bool:
        """Whether to save `step` and stop; call once at every step boundary (every process
        must, with the same steps, for the multihost sync point)."""
        preempted = reached_preemption(step)
        if preempted and self.signal_name is None:
            self.signal_name = "preemption notice"
        return preempted or self.signal_name is not None

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
