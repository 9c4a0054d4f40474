"""`python -m moejax.compress`: a trained workdir in, a pruned workdir out that eval.py reads."""

import ast
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_compress_writes_a_pruned_workdir_that_eval_reads(run, tmp_path):
    before = _digest(run)
    out = tmp_path / "pruned"
    command = [sys.executable, "-m", "moejax.compress", "--workdir", str(run), "--out", str(out)]
    options = [
        "--method",
        "sparsegpt",
        "--sparsity",
        "0.5",
        "--pattern",
        "2:4",
        "--refine",
        "dsnot",
    ]
    done = subprocess.run(
        [*command, *options, "--calib_batches", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert _digest(run) == before  # W is only read
    from moejax.training.restore import restore_run

    _, step, variables = restore_run(out)
    assert step == restore_run(run)[1]
    for block in variables["params"]["blocks"].values():
        for name in ("w_gate", "w_up", "w_down"):
            w = np.asarray(block["ffn"][name])
            groups = (w != 0).reshape(*w.shape[:-2], -1, 4, w.shape[-1]).sum(-2)
            assert np.all(groups <= 2), name
    evaluated = subprocess.run(
        [sys.executable, "eval.py", "--workdir", str(out), "--sample_bytes", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads(next((out / "eval").glob("step_*.json")).read_text())
    assert 0 < results["bits_per_byte"] < 10
    bad = subprocess.run(
        [*command[:-1], str(tmp_path / "other"), "--method", "obs"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (
        bad.returncode == 2
        and "--method: 'obs'; allowed: magnitude, wanda, sparsegpt, armor" in (bad.stderr)
    )
    # A check only the driver can make (ARMOR has no unstructured form): one line, exit 2.
    unstructured = subprocess.run(
        [*command[:-1], str(tmp_path / "armor"), "--method", "armor", "--calib_batches", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert unstructured.returncode == 2, unstructured.stderr[-3000:]
    assert "nm: got None" in unstructured.stderr and "Traceback" not in unstructured.stderr


def test_each_family_checks_the_options_it_reads():
    from moejax.compress import FAMILIES, FAMILY_OF, Request
    from moejax.config import ConfigError

    with pytest.raises(ConfigError, match="--keep_experts: 0; allowed: >= 1"):
        Request("mc_smoe")
    with pytest.raises(ConfigError, match="--experts 2 --top_k 3"):
        Request("readme", experts=2, top_k=3)
    assert Request("readme", experts=4, top_k=2).describe() == "readme, 4 experts, top 2"
    assert Request("frequency", keep_experts=2).describe() == "frequency, 2 experts kept"
    gqsa = Request("gqsa", group_sparsity=0.5)
    assert gqsa.describe() == "gqsa, 4 bits per 32, 50% of groups removed"
    assert Request("rtn").describe() == "rtn, 4 bits per 32"
    with pytest.raises(ConfigError, match="--group_sparsity: 1.0"):
        Request("gqsa", group_sparsity=1.0)
    assert not FAMILIES[FAMILY_OF["readme"]].hf_form
    assert not FAMILIES[FAMILY_OF["mc_smoe"]].under_mesh and FAMILIES["prune"].under_mesh


def test_merging_experts_writes_a_new_architecture_that_eval_reads(run, tmp_path):
    """MC-SMoE to 2 experts: OUT's config and checkpoint hold the new MoE layers (a fresh
    optimizer at W's step), and eval.py restores and evaluates them."""
    from moejax.training.restore import read_run, restore_run

    out = tmp_path / "merged"
    done = subprocess.run(
        [sys.executable, "-m", "moejax.compress", "--workdir", str(run), "--out", str(out)]
        + ["--method", "mc_smoe", "--keep_experts", "2", "--calib_batches", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "mc_smoe, 2 experts kept" in done.stdout
    assert read_run(out).model.moe.num_experts == 2
    _, step, variables = restore_run(out)
    assert step == restore_run(run)[1]
    for block in variables["params"]["blocks"].values():
        assert block["ffn"]["w_gate"].shape[0] == 2 and block["ffn"]["router"].shape[1] == 2
    evaluated = subprocess.run(
        [sys.executable, "eval.py", "--workdir", str(out), "--sample_bytes", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]


def test_compress_with_the_experts_sharded_matches_one_device(run, tmp_path):
    """The run's own mesh: the same run with its experts over `expert=4` (expert-parallel
    dispatch, 8 devices) routes every calibration token to the same experts and prunes to the
    same layer errors as the run on its data-parallel mesh."""
    sharded = tmp_path / "sharded"
    shutil.copytree(run, sharded)
    config = json.loads((sharded / "config.json").read_text())
    config["mesh"]["expert"] = 4
    config["model"]["moe"]["dispatch"] = {"name": "expert_parallel", "options": {}}
    (sharded / "config.json").write_text(json.dumps(config))
    reports = {}
    for name, workdir in (("plain", run), ("sharded", sharded)):
        done = subprocess.run(
            [sys.executable, "-m", "moejax.compress", "--workdir", str(workdir)]
            + ["--out", str(tmp_path / f"out_{name}"), "--method", "sparsegpt"]
            + ["--calib_batches", "1"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        reports[name] = [
            ast.literal_eval(line.split(": ", 1)[1])
            for line in done.stdout.splitlines()
            if line.startswith("  block")
        ]
    assert len(reports["plain"]) == len(reports["sharded"]) > 0
    for plain, sharded_block in zip(reports["plain"], reports["sharded"], strict=True):
        assert plain["expert_tokens"] == sharded_block["expert_tokens"]
        np.testing.assert_allclose(plain["layer_error"], sharded_block["layer_error"], rtol=1e-4)
