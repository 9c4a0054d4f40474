"""The Hugging Face reference for the checkpoint-loading tests: `transformers` in a subprocess.

moejax's .venv has no torch (PyPI's build for Python 3.12 is 5 GB of CUDA). scripts/setup.sh
makes .venv-hf (Python 3.11, the CPU torch, transformers) and scripts/hf_reference.py runs
there; this module only starts it and reads what it writes.
"""

import functools
import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "hf_reference.py"
VENV_PYTHON = ROOT / ".venv-hf" / "bin" / "python"
ARCHITECTURES = (
    "llama",
    "llama_tied",
    "mixtral",
    "olmoe",
    "qwen2_moe",
    "qwen3_moe",
    "deepseek_v3",
)
# Importing torch and transformers takes seconds; a build of every architecture about ten more.
TIMEOUT_S = 600


@functools.cache
def reference_python() -> str | None:
    """The .venv-hf interpreter, or None where it is missing or cannot import transformers."""
    if not VENV_PYTHON.exists():
        return None
    probe = subprocess.run(
        [
            str(VENV_PYTHON),
            "-c",
            # transformers imports lazily; find torch without paying for its import.
            "import importlib.util, transformers, safetensors, tokenizers;"
            "assert importlib.util.find_spec('torch')",
        ],
        capture_output=True,
        timeout=TIMEOUT_S,
    )
    return str(VENV_PYTHON) if probe.returncode == 0 else None


def require_reference() -> str:
    """The .venv-hf interpreter; skips the test without it, or fails it where
    MOEJAX_REQUIRE_HF_REFERENCE=1 (CI)."""
    python = reference_python()
    if python is None:
        reason = (
            f"no Hugging Face reference: {VENV_PYTHON} is missing or cannot import transformers; "
            "bash scripts/setup.sh makes it (it needs a Python 3.11)"
        )
        if os.environ.get("MOEJAX_REQUIRE_HF_REFERENCE") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return python


def _run(*args: str | Path) -> str:
    command = [require_reference(), str(SCRIPT), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited with {result.returncode}:\n{result.stderr[-4000:]}"
        )
    return result.stdout


def build_checkpoints(out_dir: Path, archs: list[str] | None = None) -> dict[str, Path]:
    """Builds tiny random checkpoints, each in out_dir/NAME with its reference.npz, in one
    process; the JSON summary (tensor names and shapes, config fields) goes to
    out_dir/summary.json. Returns {name: directory}."""
    names = list(archs or ARCHITECTURES)
    summary = _run("build", "--out", out_dir, "--arch", *names)
    (out_dir / "summary.json").write_text(summary)
    return {name: out_dir / name for name in names}


def shared_checkpoints(build_once: Callable[[str, Callable[[Path], object]], Path]) -> Path:
    """Every architecture, built once per test run for all test modules and pytest-xdist
    workers; `build_once` is the conftest fixture of that name."""
    require_reference()
    return build_once("hf_checkpoints", build_checkpoints)


def summary(checkpoints: Path) -> dict:
    """What `build` reported: per architecture its tensors, config fields and logits std."""
    return json.loads((checkpoints / "summary.json").read_text())


def reference_logits(model_dir: Path, tokens: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """transformers' prefill logits: [batch, seq, vocab] float32 for tokens: [batch, seq], the
    weights in `dtype` (float32 or bfloat16)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokens_file, out = Path(tmp) / "tokens.npy", Path(tmp) / "logits.npy"
        np.save(tokens_file, np.asarray(tokens, np.int32))
        _run(
            "logits", "--model", model_dir, "--tokens", tokens_file, "--out", out, "--dtype", dtype
        )
        return np.load(out)


def reference_logits_many(pairs: list[tuple[Path, np.ndarray]]) -> list[np.ndarray]:
    """`reference_logits` (float32) of several (checkpoint, tokens) pairs in one subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        arguments = []
        for i, (model_dir, tokens) in enumerate(pairs):
            tokens_file = Path(tmp) / f"tokens{i}.npy"
            np.save(tokens_file, np.asarray(tokens, np.int32))
            arguments += [model_dir, tokens_file]
        out = Path(tmp) / "logits.npz"
        _run("logits-many", "--pairs", *arguments, "--out", out)
        with np.load(out) as result:
            return [result[str(i)] for i in range(len(pairs))]


def reference_decode(
    model_dir: Path, prompt: np.ndarray, new: int
) -> tuple[np.ndarray, np.ndarray]:
    """transformers' greedy decode with its KV cache, no eos: tokens [batch, new] int32 and each
    step's raw logits [batch, new, vocab] float32, for prompt: [batch, prompt_len]."""
    with tempfile.TemporaryDirectory() as tmp:
        prompt_file, out = Path(tmp) / "prompt.npy", Path(tmp) / "decode.npz"
        np.save(prompt_file, np.asarray(prompt, np.int32))
        _run("decode", "--model", model_dir, "--prompt", prompt_file, "--new", new, "--out", out)
        with np.load(out) as result:
            return result["tokens"], result["logits"]
