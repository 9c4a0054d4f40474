"""Stop requests: SIGTERM / SIGINT, taken by every process of a run at the same step.

A signal only sets a flag; the training loop asks `should_stop(step)` once per step boundary,
then saves that step and waits for the save before it returns. Handlers stay installed until
the run has closed its checkpoints, so a second signal during the final save is noted and
cannot abort it.

With several processes (`jax.distributed`) each must stop at the same step, or the save's
collectives hang. The process that gets the signal posts it to the coordination service; a
watcher thread in every process sees the post and runs the agreement: under the lock that
`should_stop` takes, each process posts the last step it has reported, all meet at a barrier,
and the stop step is the largest posted step plus one. No process passes a boundary while its
post is pending, and each reports every step in order, so every process meets that step.

This is the protocol of JAX's preemption sync manager, kept here on a counter only the loop
writes. JAX's manager keeps one counter per process that every caller of
`reached_preemption_sync_point` sets, and Orbax's checkpoint manager calls it from its
finalize thread with the step of the save it finishes: a notice that arrived just after such a
call agreed on the step after that older save, which the loop had already passed, and the run
never stopped (CI saw a SIGTERM'd run still training 180 s later).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading

from moejax.parallel import distributed

log = logging.getLogger(__name__)

# How long the processes wait for each other at the agreement's barrier. Every watcher sees the
# request within milliseconds and takes its lock between two of its loop's step boundaries, so
# one that does not come within a minute is gone (the next step's collectives would fail on it
# anyway), and a run ending while it agrees waits no longer than this to exit.
AGREEMENT_TIMEOUT_S = 60.0
# How often the watcher looks up from its wait for a posted stop to see whether the run is over.
_WATCH_INTERVAL_MS = 500


class StopRequest:
    """Context manager turning stop signals into a stop at a step boundary, the same step on
    every process of the run.

    `coordination` is the coordination service of several processes (default: the one
    `jax.distributed` joined, if any); `namespace` prefixes its keys (default: unique per
    StopRequest, alike on every process).
    """

    def __init__(
        self,
        coordination: distributed.Coordination | None = None,
        namespace: str | None = None,
    ):
        self.signal_name: str | None = None
        self._requested: str | None = None
        self._coordination = coordination
        self._namespace = namespace
        self._previous: dict[signal.Signals, object] = {}
        self._lock = threading.Lock()
        self._last_step: int | None = None
        self._first_step_reported = threading.Event()
        self._stop_step: int | None = None
        self._closed = threading.Event()
        self._watcher: threading.Thread | None = None

    def __enter__(self) -> StopRequest:
        if self._coordination is None:
            self._coordination = distributed.coordination()
        if self._coordination is not None:
            if self._namespace is None:
                self._namespace = distributed.unique_key("stop")
            self._watcher = threading.Thread(
                target=self._watch, name="moejax-stop-agreement", daemon=True
            )
            self._watcher.start()
        # Ours even where a launcher's jax.distributed.initialize installed JAX's preemption
        # notifier (see the module docstring for why its step agreement is not used).
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Outside the main thread signals stay with the caller.
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    @property
    def _several(self) -> bool:
        return self._coordination is not None

    def request(self, name: str) -> None:
        """Asks for a stop as the signal `name` does (what the handlers call)."""
        if self._requested is not None:
            log.warning(
                "%s received while stopping: the checkpoint being saved finishes first", name
            )
            return
        self._requested = name
        if not self._several:
            self.signal_name = name
        else:
            coordination = self._coordination
            try:
                # The first post wins; every watcher reads that one, so all name the same signal.
                coordination.client.key_value_set(
                    f"{self._namespace}/requested", f"{name} to process {coordination.process_id}"
                )
            except Exception as error:  # noqa: BLE001 - posted already, or the service is gone
                if "ALREADY_EXISTS" not in str(error):
                    log.error("could not post the stop request to the other processes: %s", error)

    def _handle(self, signum: int, frame) -> None:
        self.request(signal.Signals(signum).name)

    def should_stop(self, step: int) -> bool:
        """Whether to save `step` and stop; call at every step boundary, in order (every process,
        with the same steps)."""
        if not self._several:
            return self.signal_name is not None
        # Blocks while this process's agreement is under way: its posted step must stay the last.
        with self._lock:
            self._last_step = step
            stop = self._stop_step == step
        self._first_step_reported.set()
        return stop

    def _watch(self) -> None:
        """The watcher thread: waits for a posted stop request, then agrees the stop step."""
        client, me = self._coordination.client, self._coordination.process_id
        while True:
            if self._closed.is_set():
                return
            try:
                requested = client.blocking_key_value_get(
                    f"{self._namespace}/requested", _WATCH_INTERVAL_MS
                )
                break
            except Exception as error:  # noqa: BLE001 - JaxRuntimeError, by status text
                if "DEADLINE_EXCEEDED" not in str(error):
                    if not self._closed.is_set():
                        log.error("stop requests from other processes are not seen: %s", error)
                    return
        # Before the loop's first boundary there is no step to post; the first comes soon (no
        # process can get a step ahead of another that has not started).
        while not self._first_step_reported.wait(_WATCH_INTERVAL_MS / 1000):
            if self._closed.is_set():
                return
        with self._lock:
            try:
                client.key_value_set(f"{self._namespace}/step/{me}", str(self._last_step))
                client.wait_at_barrier(
                    f"{self._namespace}/barrier", int(AGREEMENT_TIMEOUT_S * 1000)
                )
                posted = client.key_value_dir_get(f"{self._namespace}/step/")
            except Exception as error:  # noqa: BLE001
                log.error(
                    "the processes could not agree a step to stop at (%s); this one goes on", error
                )
                return
            self._stop_step = max(int(value) for _, value in posted) + 1
            self.signal_name = requested
        log.warning("%s: every process stops at step %d", requested, self._stop_step)

    def __exit__(self, *exc) -> None:
        self._closed.set()
        if self._watcher is not None:
            # Not left to die with the interpreter: a daemon thread inside (or returning from) a
            # call into JAX's client at finalization aborts the process ("exception not
            # rethrown", status -6) in place of its own exit status.
            self._watcher.join(AGREEMENT_TIMEOUT_S + 2 * _WATCH_INTERVAL_MS / 1000)
        for sig, handler in self._previous.items():
            # A handler installed outside Python (JAX's notifier) cannot be put back.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
