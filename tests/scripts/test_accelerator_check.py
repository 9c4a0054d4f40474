"""scripts/accelerator_check.sh on the CPU (its `--cpu --quick` mode, one or two parts at a time:
the whole check takes minutes here), and the exchange benchmark it runs, with the ragged
all-to-all emulated (XLA:CPU has none)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from moejax.parallel import sharding
from tests.moe.expert_mesh import emulated_ragged_all_to_all

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "accelerator_check.sh"


def _check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, str]:
    """Runs the script on the CPU with $OUT in tmp_path; returns the process and its table."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", OUT=str(tmp_path / "out"))
    env["MOEJAX_CHECK_PYTHON"] = sys.executable
    done = subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300
    )
    summary = tmp_path / "out" / "summary.txt"
    return done, summary.read_text() if summary.exists() else ""


def _row(table: str, part: str) -> list[str]:
    """The cells of `part`'s row of the summary table."""
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if cells[0] == part:
            return cells
    raise AssertionError(f"no row {part!r} in\n{table}")


def test_check_without_an_accelerator_says_what_is_missing_and_fails(tmp_path):
    done, table = _check(tmp_path, "--quick")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "jax sees no GPU or TPU" in done.stdout
    assert _row(table, "platform")[1] == "fail"
    assert _row(table, "gmm")[1:3] == ["skipped", "0s"]


def test_quick_cpu_check_passes_a_part_and_reports_its_key_numbers(tmp_path):
    done, table = _check(tmp_path, "--cpu", "--quick", "--parts", "gmm")
    assert done.returncode == 0, done.stdout + done.stderr
    assert table.strip() == done.stdout.split("\n\n")[-1].strip()
    assert _row(table, "platform")[1] == "pass"
    status, _, key = _row(table, "gmm")[1:4]
    assert status == "pass"
    assert "g=8 auto" in key and "ragged_dot's" in key
    assert "gmm forward, float32" in (tmp_path / "out" / "gmm.log").read_text()
    assert len(table.strip().splitlines()) == 6  # four header lines, platform and gmm


def test_a_part_past_its_timeout_fails_and_the_table_still_prints(tmp_path):
    done, table = _check(tmp_path, "--cpu", "--quick", "--parts", "attention,gmm",
                         "--part-timeout", "1")  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    for part in ("attention", "gmm"):
        status, _, key = _row(table, part)[1:4]
        assert status == "fail"
        assert key.startswith("timed out")


def test_bad_arguments_exit_with_status_2(tmp_path):
    done, _ = _check(tmp_path, "--parts", "gmm,warp_drive")
    assert done.returncode == 2
    assert "unknown part warp_drive" in done.stderr


def _benchmark(name: str):
    """benchmarks/<name>.py as a module (benchmarks/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exchange_benchmark_times_ragged_and_padded_to_the_same_result(monkeypatch):
    bench = _benchmark("expert_exchange")
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "expert": 8, "tensor": 1})
    shape = bench.Shape(8, 16, 32, 2, np.float32)
    index = bench.expert_choices("zipf", 8 * 8, 16)
    assert all(len(set(row)) == bench.TOP_K for row in index)
    results = {
        exchange: bench.measure(mesh, shape, index, exchange, "expert_parallel", repeats=1)
        for exchange in ("ragged", "padded")
    }
    (ragged_seconds, ragged), (_, padded) = results["ragged"], results["padded"]
    assert ragged_seconds > 0
    assert bench.relative_difference(ragged, padded) < bench.TOLERANCE["float32"]
    loss, (grad_x, grad_params) = padded
    assert np.shape(grad_x) == (64, 16) and np.isfinite(loss)
    wrong = (loss, (grad_x, {**grad_params, "w_up": grad_params["w_up"] * 1.01}))
    assert bench.relative_difference(wrong, padded) > bench.TOLERANCE["float32"]


def test_kernels_benchmark_falls_back_to_xla_attention_when_cudnn_refuses(monkeypatch, capsys):
    bench = _benchmark("kernels")
    attention = jax.nn.dot_product_attention

    def refusing(*args, implementation=None, **kwargs):
        if implementation == "cudnn":
            raise NotImplementedError("head_dim 96 is not supported\nmore detail")
        return attention(*args, implementation=implementation, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", refusing)
    assert bench.dense_attention_impl((1, 128, 2, 32), np.float32) == "xla"
    out = capsys.readouterr().out
    assert "cuDNN attention refused (NotImplementedError: head_dim 96 is not supported)" in out
    assert "implementation='xla'" in out
