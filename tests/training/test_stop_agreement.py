"""The stop agreement of several processes, on a real coordination service: a stop requested in
one process stops every process at the same step, one past the furthest any had reached.

Each "process" is a thread with its own client of one service (the service and clients JAX's
`jax.distributed.initialize` makes), running the loop's side: `should_stop(step)` at every
step boundary, in order.
"""

import logging
import threading
import time

import pytest
import run_processes as processes
from jax._src.lib import _jax

from moejax.parallel.distributed import Coordination
from moejax.training.preemption import StopRequest

# A loop that has not stopped this long after the request never will.
DEADLINE_S = 60.0


@pytest.fixture
def clients():
    """Two connected clients of one coordination service on localhost."""
    address = f"localhost:{processes.free_port()}"
    service = _jax.get_distributed_runtime_service(address, 2)
    made = [
        _jax.get_distributed_runtime_client(address, process, init_timeout=60)
        for process in range(2)
    ]
    _in_threads([client.connect for client in made])
    yield made
    # Shutting down is a barrier of every client.
    _in_threads([client.shutdown for client in made])
    service.shutdown()


def _in_threads(functions) -> None:
    threads = [threading.Thread(target=function) for function in functions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE_S)
        assert not thread.is_alive()


class _Loop(threading.Thread):
    """A training loop's stop checks from `first_step` on, one step every `step_s` seconds."""

    def __init__(self, stop: StopRequest, first_step: int, step_s: float):
        super().__init__(daemon=True)
        self.stop, self.step, self.step_s = stop, first_step, step_s
        self.stopped_at: int | None = None
        self.run_over = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline and not self.run_over.is_set():
            self.step += 1
            if self.stop.should_stop(self.step):
                self.stopped_at = self.step
                return
            time.sleep(self.step_s)


def _stop_requests(clients, namespace: str) -> list[StopRequest]:
    return [
        StopRequest(Coordination(client, process, len(clients)), namespace=namespace)
        for process, client in enumerate(clients)
    ]


def _started(stops: list[StopRequest], first_steps: tuple[int, int], step_s: float) -> list[_Loop]:
    loops = [_Loop(stop, first, step_s) for stop, first in zip(stops, first_steps, strict=True)]
    for loop in loops:
        loop.start()
    return loops


def _join(loops: list[_Loop]) -> None:
    for loop in loops:
        loop.join(DEADLINE_S)


def _wait_for_step(loop: _Loop, step: int) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while loop.step < step:
        assert time.monotonic() < deadline, f"the loop is at step {loop.step}"
        time.sleep(0.001)


def test_a_stop_requested_in_one_process_stops_both_at_one_step_past_the_furthest(clients, caplog):
    # Process 1 runs 30 steps ahead: the agreed step must be one it has not reached yet, and the
    # slow process 0 has to get there too.
    first, second = _stop_requests(clients, "agree")
    with first, second, caplog.at_level(logging.WARNING):
        loops = _started([first, second], (0, 30), 0.004)
        _wait_for_step(loops[0], 5)
        reached_at_the_request = loops[1].step
        second.request("SIGTERM")
        _join(loops)
    assert loops[0].stopped_at is not None and loops[0].stopped_at == loops[1].stopped_at
    assert loops[1].stopped_at > reached_at_the_request >= 30
    assert first.signal_name == second.signal_name == "SIGTERM to process 1"
    assert f"every process stops at step {loops[0].stopped_at}" in caplog.text


def test_a_stop_requested_before_the_first_step_stops_both_at_one_step_after_it(clients):
    first, second = _stop_requests(clients, "early")
    with first, second:
        first.request("SIGINT")
        # Neither stops alone: the agreement waits for both loops' first report.
        loops = _started([first, second], (100, 100), 0.01)
        _join(loops)
    # Step 101 is where the agreement can start (102 at once; later if a watcher is slow to run).
    assert loops[0].stopped_at is not None and loops[0].stopped_at == loops[1].stopped_at
    assert loops[0].stopped_at >= 102
    assert first.signal_name == second.signal_name == "SIGINT to process 0"


def test_requests_in_both_processes_agree_on_one_step_and_one_name(clients, caplog):
    first, second = _stop_requests(clients, "both")
    with first, second, caplog.at_level(logging.WARNING):
        loops = _started([first, second], (0, 0), 0.003)
        _wait_for_step(loops[1], 3)
        first.request("SIGTERM")
        second.request("SIGTERM")
        second.request("SIGINT")  # a second signal to the same process only logs
        _join(loops)
    assert loops[0].stopped_at is not None and loops[0].stopped_at == loops[1].stopped_at
    assert first.signal_name == second.signal_name == "SIGTERM to process 0"
    assert "SIGINT received while stopping" in caplog.text


def test_without_a_request_the_watchers_end_with_the_run(clients):
    first, second = _stop_requests(clients, "idle")
    with first, second:
        loops = _started([first, second], (0, 0), 0.001)
        _wait_for_step(loops[0], 20)
        _wait_for_step(loops[1], 20)
        for loop in loops:
            loop.run_over.set()
        _join(loops)
    assert first.signal_name is None and second.signal_name is None
    for stop in (first, second):
        stop._watcher.join(5.0)
        assert not stop._watcher.is_alive()
    assert loops[0].stopped_at is None and loops[1].stopped_at is None
