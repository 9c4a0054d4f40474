"""`python -m moejax.training.aot`: a report and status 0 when the step fits, status 1 when it does
not, one line and status 2 for a topology or config it cannot compile for."""

import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("libtpu", reason="compiling for a TPU topology needs libtpu ([tpu] extra)")

from moejax.parallel import hlo  # noqa: E402

ROOT = pathlib.Path(__file__).parents[2]


def _aot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moejax.training.aot", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _own_lines(stderr: str) -> list[str]:
    """stderr without libtpu's start-up complaint about the TPU slice it is not running on."""
    return [line for line in stderr.splitlines() if "host bounds" not in line]


def test_a_step_that_fits_prints_memory_flops_and_collectives():
    # Small: XLA's TPU compile time grows with the batch (21 s at 8 sequences, 100 s at 32).
    result = _aot(
        "--topology",
        "v5e:1x1",
        "--config.model.num_layers=1",
        "--config.model.moe.dispatch.name=capacity",
        "--config.data.global_batch_size=8",
        "--config.data.eval_batch_size=8",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("v5e:1x1: 1 devices (TPU v5 lite), mesh data=1 fsdp=1 expert=1 tensor=1")
    assert "of 16.00 HBM" in out
    assert "flops per step per device: " in out
    # One chip: every kind is listed, none runs.
    for kind in hlo.KINDS:
        assert f"  {kind:<20} {0:>6} {0:>12.3f}" in out


def test_a_step_that_does_not_fit_says_so_and_exits_1():
    result = _aot(
        "--topology",
        "v5e:1x1",
        "--config.model.num_layers=1",
        "--config.model.moe.dispatch.name=capacity",
        "--config.data.global_batch_size=8192",
        "--config.data.seq_len=256",
    )
    assert result.returncode == 1, result.stderr
    message = "\n".join(_own_lines(result.stderr))
    assert message.startswith("does not fit: v5e:1x1: the step does not fit in 16.00 GiB")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--topology", "v7x:2x2"),
            "topology error: --topology 'v7x:2x2': allowed are <tpu>:<chips per axis> with tpu "
            "one of v4, v5e, v5p, v6e",
        ),
        (
            ("--topology", "v5p:3x3x3"),
            "topology error: --topology 'v5p:3x3x3': libtpu refuses it: INVALID_ARGUMENT",
        ),
        (
            ("--topology", "v5p:2x2x2", "--config.mesh.expert=3"),
            "config error: mesh: data=-1 x fsdp=1 x expert=3 x tensor=1 cannot fill 8 devices",
        ),
        (
            (
                "--topology",
                "v5p:2x2x2",
                "--config.model.moe.num_experts=6",
                "--config.mesh.expert=4",
            ),
            "config error: model.moe.num_experts",
        ),
    ],
)
def test_input_errors_are_one_line_and_exit_2(args, message):
    result = _aot(*args)
    assert result.returncode == 2, result.stderr
    lines = _own_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert result.stdout == ""
