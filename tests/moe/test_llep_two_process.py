"""LLEP across two processes: tests/moe/llep_two_process_worker.py twice on localhost, 4 CPU devices
each, an 8-device mesh whose expert exchanges and weight transfers cross the processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).with_name("llep_two_process_worker.py")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


def test_llep_equals_plain_expert_parallelism_across_two_processes(tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    port = _free_port()
    logs = [(tmp_path / f"worker{i}.out", tmp_path / f"worker{i}.err") for i in range(2)]
    workers = []
    for process_id, (out, err) in enumerate(logs):
        with out.open("w") as stdout, err.open("w") as stderr:
            command = [sys.executable, str(WORKER), str(port), str(process_id)]
            workers.append(subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr))
    try:
        codes = [worker.wait(timeout=120) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for code, (_, err) in zip(codes, logs, strict=True):
        assert code == 0, err.read_text()[-4000:]
    reports = [json.loads(out.read_text().strip().splitlines()[-1]) for out, _ in logs]
    assert reports[0] == reports[1], "both processes see the same gathered results"
    for report in reports[0]:
        assert report["process_count"] == 2 and report["devices"] == 8
        assert report["worst_relative_to_tolerance"] <= 1.0
