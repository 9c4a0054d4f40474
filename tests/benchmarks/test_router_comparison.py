"""The router comparison benchmark, end to end on a tiny model."""

import importlib.util
import json
import math
import pathlib
import sys

import matplotlib.image
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def router_comparison():
    path = ROOT / "benchmarks" / "router_comparison.py"
    spec = importlib.util.spec_from_file_location("router_comparison", path)
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses look their module up in sys.modules.
    monkeypatch_modules = pytest.MonkeyPatch()
    monkeypatch_modules.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    yield module
    monkeypatch_modules.undo()


def test_writes_table_json_and_curves_for_each_router(router_comparison, data_dir, tmp_path):
    out = tmp_path / "comparison"
    status = router_comparison.main(
        [
            "--config",
            str(ROOT / "configs" / "tiny.py"),
            "--override",
            f"data.data_dir={data_dir}",
            # One layer compiles in half the time, and larger batches evaluate the whole
            # validation split in fewer steps; the two runs still train, evaluate and compare.
            "--override",
            "model.num_layers=1",
            "--override",
            "data.eval_batch_size=128",
            "--steps",
            "6",
            "--seeds",
            "0",
            "--routers",
            "softmax_top_k",
            "hash_layer",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    results = json.loads((out / "results.json").read_text())
    rows = {row["router"]: row for row in results["rows"]}
    assert set(rows) == {"softmax_top_k", "hash_layer"}
    for row in rows.values():
        assert row["seeds"] == [0] and not row["errors"]
        assert math.isfinite(row["bits_per_byte_mean"])
        assert row["curve"][-1][0] == 6
    assert (
        "| router | seeds | val bits/byte | vs softmax_top_k |" in (out / "results.md").read_text()
    )
    pixels = matplotlib.image.imread(out / "validation_curves.png")
    assert pixels.shape == (500, 800, 4) and pixels.std() > 0


def test_dense_variant_matches_active_feed_forward_width(router_comparison):
    from moejax.config import Config

    base = Config()
    dense = router_comparison.variant_config(base, "dense", seed=3)
    assert dense.model.moe.every == 0
    assert dense.model.d_ff == base.model.moe.top_k * base.model.moe.expert_d_ff
    assert dense.train.seed == 3 and dense.data.shuffle_seed == 3


def test_failed_router_is_reported_and_the_rest_summarised(router_comparison):
    runs = [
        {
            "router": "softmax_top_k",
            "seed": 0,
            "bits_per_byte": 2.0,
            "loss": 1.4,
            "imbalance": 1.1,
            "entropy": 0.9,
            "token_sparsity": 0.5,
            "chunk_sparsity": 0.1,
            "tokens_per_second": 100.0,
            "curve": [[0, 8.0], [10, 2.0]],
        },
        {"router": "hash_layer", "seed": 0, "error": "ValueError: boom"},
    ]
    rows = router_comparison.summarise(runs, ["softmax_top_k", "hash_layer"])
    assert rows[0]["vs_softmax_top_k_percent"] == 0.0
    assert rows[1]["bits_per_byte_mean"] is None and rows[1]["errors"] == [
        "seed 0: ValueError: boom"
    ]
