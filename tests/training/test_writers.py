"""Metric writers and the command-line override parser."""

import io
import json
import struct

import matplotlib.image
import numpy as np
import pytest

from moejax import cli
from moejax.config import ConfigError
from moejax.evaluation import routing_table
from moejax.training.writers import MetricsWriter, flatten_metrics


def test_flatten_metrics_expands_vectors():
    flat = flatten_metrics(
        {"loss": np.float32(2.5), "moe/layer0/expert_load": np.array([0.25, 0.75])}
    )
    assert flat == {"loss": 2.5, "moe/layer0/expert_load/0": 0.25, "moe/layer0/expert_load/1": 0.75}


def test_writer_appends_jsonl_and_tensorboard_events(tmp_path):
    writer = MetricsWriter(tmp_path)
    writer.write(5, "train", {"loss": 1.5, "grad_norm": float("nan")})
    writer.write(10, "eval", {"loss": 1.25})
    writer.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0] == {"step": 5, "split": "train", "loss": 1.5, "grad_norm": "nan"}
    assert records[1]["split"] == "eval" and records[1]["loss"] == 1.25
    assert any(
        p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir()
    )


def test_writer_logs_images_to_tensorboard(tmp_path):
    from tensorboardX.proto import event_pb2

    rgb = np.zeros((6, 5, 3), np.uint8)
    rgb[2, 3] = (255, 0, 0)
    writer = MetricsWriter(tmp_path)
    writer.write_image(40, "eval/expert_load", rgb)
    with pytest.raises(ValueError, match="rgb"):
        writer.write_image(40, "eval/expert_load", rgb[..., 0])
    writer.close()
    (path,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    images, data, offset = [], path.read_bytes(), 0
    while offset < len(data):
        (length,) = struct.unpack("<Q", data[offset : offset + 8])
        event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
        offset += 12 + length + 4
        images += [(event.step, value) for value in event.summary.value if value.HasField("image")]
    ((step, value),) = images
    assert (step, value.tag) == (40, "eval/expert_load")
    assert (value.image.height, value.image.width, value.image.colorspace) == (6, 5, 3)
    decoded = matplotlib.image.imread(io.BytesIO(value.image.encoded_image_string))
    np.testing.assert_array_equal(np.rint(decoded[..., :3] * 255).astype(np.uint8), rgb)


def test_routing_table_lists_every_moe_layer():
    results = {}
    for layer in (0, 2):
        prefix = f"moe/layer{layer}/"
        results.update(
            {
                prefix + "expert_load": np.array([0.5, 0.5]),
                prefix + "dropped_fraction": 0.0,
                prefix + "routing_entropy": 0.69,
                prefix + "load_max_over_mean": 1.0,
                prefix + "active_experts_per_token": 2.0,
                prefix + "token_sparsity": 0.0,
                prefix + "chunk_sparsity": 0.0,
            }
        )
    table = routing_table(results).splitlines()
    assert len(table) == 3 and table[2].split()[0] == "2"
    assert routing_table({"loss": 1.0}) == "(no MoE layers)"


def test_cli_splits_config_overrides():
    rest, overrides = cli.split_overrides(
        ["--workdir", "w", "--config.model.moe.top_k=1", "--config.train.steps", "5"]
    )
    assert rest == ["--workdir", "w"]
    assert overrides == ["model.moe.top_k=1", "train.steps=5"]
    with pytest.raises(ConfigError, match="missing a value"):
        cli.split_overrides(["--config.train.steps"])
