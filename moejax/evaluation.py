"""Validation loss, bits per byte and per-layer routing statistics of a set of parameters."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from moejax.training.step import MeshStep, global_batch


def evaluate(eval_step: MeshStep, params: Any, batches: Iterable[dict[str, np.ndarray]]):
    """Runs `eval_step` over `batches`; returns a dict of floats and per-expert arrays.

    `loss` is the mean next-byte negative log-likelihood in nats, `bits_per_byte` the same in
    bits (the corpus is byte-level, one token per byte), `perplexity` exp(loss); routing
    statistics (`moe/layer{i}/...`) are averaged over batches.
    """
    nll, tokens, routing_sums, count = 0.0, 0.0, {}, 0
    for batch in batches:
        out = jax.device_get(eval_step(params, global_batch(eval_step.mesh, batch)))
        nll += float(out.pop("nll_sum"))
        tokens += float(out.pop("tokens"))
        for name, value in out.items():
            routing_sums[name] = routing_sums.get(name, 0.0) + np.asarray(value, np.float64)
        count += 1
    if count == 0:
        raise ValueError("evaluate: no validation batches (is the validation split empty?)")
    loss = nll / tokens
    results: dict[str, Any] = {
        "loss": loss,
        "bits_per_byte": loss / math.log(2.0),
        "perplexity": math.exp(loss),
        "tokens": tokens,
    }
    results.update({name: total / count for name, total in routing_sums.items()})
    return results


def routing_table(results: dict[str, Any]) -> str:
    """A text table of the per-layer routing statistics in `results`."""
    layers = sorted(
        {name.split("/")[1] for name in results if name.startswith("moe/")},
        key=lambda layer: int(layer.removeprefix("layer")),
    )
    if not layers:
        return "(no MoE layers)"
    lines = [f"{'layer':>6} {'dropped':>8} {'entropy':>8} {'max/mean':>9}  expert load fractions"]
    for layer in layers:
        prefix = f"moe/{layer}/"
        load = np.asarray(results[prefix + "expert_load"])
        lines.append(
            f"{layer.removeprefix('layer'):>6} {float(results[prefix + 'dropped_fraction']):8.4f}"
            f" {float(results[prefix + 'routing_entropy']):8.4f}"
            f" {float(results[prefix + 'load_max_over_mean']):9.3f}  "
            + " ".join(f"{x:.3f}" for x in load)
        )
    return "\n".join(lines)


def evaluate_workdir(
    workdir: str | Path,
    *,
    step: int | None = None,
    overrides: Sequence[str] = (),
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
    """Restores the checkpoint of `workdir` at `step` (default: latest good) onto the devices
    present, on the mesh of the saved config with `overrides` applied, and evaluates it.

    Only `mesh.*` and `data.*` fields may be overridden: the model must match the checkpoint.
    """
    from moejax import config as config_lib
    from moejax import sharding
    from moejax.data import pipeline, shakespeare
    from moejax.training import state as state_lib
    from moejax.training.checkpoint import Checkpointer
    from moejax.training.loop import CHECKPOINT_DIR, CONFIG_FILE, resolve_data_dir
    from moejax.training.step import make_eval_step

    workdir = Path(workdir).absolute()
    config_path = workdir / CONFIG_FILE
    if not config_path.exists():
        raise ValueError(f"--workdir: {workdir} holds no {CONFIG_FILE}; is it a training run?")
    for override in overrides:
        if not override.startswith(("mesh.", "data.")):
            raise config_lib.ConfigError(
                f"eval override {override!r}: only mesh.* and data.* fields can change at eval"
            )
    config = config_lib.apply_overrides(config_lib.load_json(config_path), overrides)
    devices = list(jax.devices() if devices is None else devices)
    axis_sizes = config_lib.validate(config, len(devices))
    mesh = sharding.make_mesh(axis_sizes, devices)

    spec = state_lib.model_spec(config.model)
    optimizer = state_lib.make_optimizer(config.train)
    abstract_state, shardings = state_lib.state_shardings(spec, optimizer, mesh)
    checkpointer = Checkpointer(
        workdir / CHECKPOINT_DIR, keep=config.train.keep_checkpoints, async_save=False
    )
    try:
        if step is not None and step not in checkpointer.all_steps():
            raise ValueError(
                f"--step: no checkpoint at step {step}; available: {checkpointer.all_steps()}"
            )
        restored = checkpointer.restore_latest_good(
            state_lib.abstract_with_shardings(abstract_state, shardings), step=step
        )
    finally:
        checkpointer.close()
    if restored is None:
        raise ValueError(f"--workdir: no checkpoint in {workdir / CHECKPOINT_DIR}")
    restored_step, state, _, damaged = restored

    data_dir = resolve_data_dir(config.data.data_dir)
    shakespeare.prepare(str(data_dir))
    batches = pipeline.make_eval_batches(
        str(data_dir),
        seq_len=config.data.seq_len,
        batch_size=config.data.eval_batch_size,
        max_batches=config.data.eval_batches or None,
    )
    results = evaluate(make_eval_step(spec, mesh, shardings["params"]), state["params"], batches)
    results.update(step=restored_step, damaged_steps=damaged, mesh=axis_sizes)
    return results
