"""One config, three meshes (1 device; 8 devices two ways): the same loss curve."""

import json

import jax
import numpy as np

from moejax.training.loop import train

# Experts split over mesh.expert are expert parallelism, named by the dispatch strategy.
EXPERT_PARALLEL = "model.moe.dispatch.name=expert_parallel"


def _train_losses(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["split"] == "train"]
    return np.array([r["loss"] for r in train_records]), [r["step"] for r in train_records]


def test_loss_curve_is_the_same_on_one_and_eight_devices(tiny_config, tmp_path):
    overrides = (
        "train.steps=12",
        "train.log_every=1",
        "train.eval_every=12",
        "train.checkpoint_every=12",
        # One layer holds every exchange and reduction the meshes differ in.
        "model.num_layers=1",
    )
    runs = {
        "one_device": (tiny_config(*overrides, "mesh.data=1"), jax.devices()[:1]),
        "data2_expert4": (
            tiny_config(*overrides, EXPERT_PARALLEL, "mesh.data=2", "mesh.expert=4"),
            None,
        ),
        "fsdp2_expert2_tensor2": (
            tiny_config(
                *overrides,
                EXPERT_PARALLEL,
                "mesh.data=1",
                "mesh.fsdp=2",
                "mesh.expert=2",
                "mesh.tensor=2",
            ),
            None,
        ),
    }
    curves = {}
    for name, (config, devices) in runs.items():
        result = train(config, tmp_path / name, devices=devices, progress=False)
        assert result.step == 12
        curves[name], steps = _train_losses(tmp_path / name)
        assert steps == list(range(1, 13))
    reference = curves["one_device"]
    assert reference[-1] < reference[0]
    for name, curve in curves.items():
        np.testing.assert_allclose(curve, reference, rtol=2e-5, err_msg=name)
