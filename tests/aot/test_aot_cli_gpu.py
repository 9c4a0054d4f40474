"""`python -m moejax.training.aot --topology h100:8`: the GPU report, and one line with exit 2 for
a GPU topology it cannot compile for."""

import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("jax_plugins.xla_cuda12", reason="GPU compiles need the [cuda-aot] extra")

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
    """stderr without the start-up lines of libtpu and XLA (glog-style, or their tracebacks)."""
    return [line for line in stderr.splitlines() if line.startswith(("topology error", "does not"))]


def test_a_gpu_step_prints_memory_against_the_gpu_and_the_collectives():
    result = _aot(
        "--topology",
        "h100:2",
        "--config.model.num_layers=1",
        "--config.mesh.expert=2",
        "--config.model.moe.dispatch.name=expert_parallel",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert out.startswith(
        "h100:2: 2 devices (NVIDIA H100 80GB HBM3), mesh data=1 fsdp=1 expert=2 tensor=1"
    )
    assert "of 79.65 HBM" in out
    assert "flops per step per device: not available" in out
    ragged = next(line for line in out.splitlines() if line.startswith("  ragged-all-to-all"))
    assert int(ragged.split()[1]) >= 4, out  # two exchanges forward, two backward
    for kind in hlo.KINDS:
        assert f"  {kind:<20} " in out


@pytest.mark.parametrize(
    ("topology", "message"),
    [
        (
            "b300:8",
            "topology error: --topology 'b300:8': allowed are <tpu>:<chips per axis> with tpu one "
            "of v4, v5e, v5p, v6e (e.g. v5p:2x2x2, v5p:4x4x4, v5e:2x2, v6e:1x1), or "
            "<gpu>:<gpus per node> or <gpu>:<nodes>x<gpus per node> with gpu one of h100, h200, "
            "a100 (e.g. h100:8, h100:2x8)",
        ),
        (
            "h100:0",
            "topology error: --topology 'h100:0': a GPU topology is <gpu>:<gpus per node> or "
            "<gpu>:<nodes>x<gpus per node>, each at least 1, e.g. h100:8, h100:2x8",
        ),
        ("h100:2x2x8", "topology error: --topology 'h100:2x2x8': a GPU topology is"),
    ],
)
def test_a_gpu_topology_it_cannot_compile_for_is_one_line_and_exit_2(topology, message):
    result = _aot("--topology", topology)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = _own_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr[-3000:]
    assert result.stdout == ""
