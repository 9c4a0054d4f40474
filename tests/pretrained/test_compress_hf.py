"""`python -m moejax.compress --hf DIR --text FILE`: a Hugging Face checkpoint compressed from
calibration text into another checkpoint directory, the input only read."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moejax.pretrained import from_hf
from tests.pretrained.reference import shared_checkpoints

ROOT = Path(__file__).resolve().parents[2]


def _digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_compress_hf_writes_a_pruned_checkpoint_that_loads_back(build_once, tmp_path):
    pytest.importorskip("tokenizers")
    hf_dir = shared_checkpoints(build_once) / "olmoe"
    before = _digest(hf_dir)
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 200)
    out = tmp_path / "pruned"
    command = [sys.executable, "-m", "moejax.compress", "--hf", str(hf_dir), "--out", str(out)]
    done = subprocess.run(
        [*command, "--text", str(text), "--method", "wanda", "--calib_batches", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _digest(hf_dir) == before  # the input is only read
    assert (out / "tokenizer.json").is_file()
    model, _ = from_hf(out)
    for block in model.blocks:
        w = np.asarray(block.ffn.w_gate[...])  # [experts, d_model, d_ff]
        share = np.mean(w == 0, axis=(1, 2))
        np.testing.assert_allclose(share, 0.5, atol=0.02)
    bad = subprocess.run(
        [*command[:-1], str(tmp_path / "other")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "--hf and --text go together" in bad.stderr
