"""Evaluation of a saved run and its reports: restore a workdir's checkpoint and measure its
validation loss, bits per byte, routing statistics, routing fluctuation against an earlier
checkpoint, inter-layer expert affinity and sparsity (what `eval.py` prints), and the text
tables of those results.

The loss and routing statistics themselves are `moejax.training.evaluate`, the evaluation the
training loop runs; this module imports from `moejax.training` and nothing there imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from moejax import metrics
from moejax.training.evaluate import evaluate, moe_layers
from moejax.training.step import MeshStep, global_batch

if TYPE_CHECKING:
    from moejax.config import Config
    from moejax.training.state import ModelSpec

log = logging.getLogger(__name__)


def routing_top1(
    build_model: Any, mesh: Any, variables: Any, batch: dict[str, np.ndarray]
) -> dict[int, np.ndarray]:
    """Layer index -> `[tokens]` top-1 expert of every MoE layer on `batch["inputs"]` (eval mode).

    `build_model(variables)` returns the model (`ModelSpec.merge`).
    """

    def run(variables, inputs):
        _, aux_per_layer = build_model(variables)(inputs, train=False)
        return {
            layer: aux["top1_expert"]
            for layer, aux in enumerate(aux_per_layer)
            if aux is not None and "top1_expert" in aux
        }

    # Replicated, so that every process can read all of it back.
    step = MeshStep(jax.jit(run, out_shardings=NamedSharding(mesh, PartitionSpec())), mesh)
    inputs = global_batch(mesh, {"inputs": batch["inputs"]})["inputs"]
    return {
        layer: np.asarray(index) for layer, index in jax.device_get(step(variables, inputs)).items()
    }


def routing_dynamics(
    top1: dict[int, np.ndarray],
    num_experts: int,
    previous_top1: dict[int, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Routing fluctuation against an earlier checkpoint and inter-layer expert affinity.

    Per MoE layer `l` (as `moe/layer{l}/...`): `routing_fluctuation`, the share of the fixed
    batch's tokens whose top-1 expert differs from `previous_top1` (StableMoE); and for each MoE
    layer after the first, `affinity` `[experts, experts]` = P(e at this layer | e' at the previous
    MoE layer) and `affinity_predictability`, the share of tokens whose expert is the most likely
    successor of their previous one (about 1 / experts for unrelated layers). Layers that saw a
    different token set (mixture-of-depths) are left out of both.
    """
    results: dict[str, Any] = {}
    layers = sorted(top1)
    for layer in layers:
        before = None if previous_top1 is None else previous_top1.get(layer)
        if before is not None and before.shape == top1[layer].shape:
            fluctuation = metrics.routing_fluctuation(before[:, None], top1[layer][:, None])
            results[f"moe/layer{layer}/routing_fluctuation"] = float(fluctuation)
    for previous, layer in zip(layers, layers[1:], strict=False):
        if top1[previous].shape != top1[layer].shape:
            continue
        affinity = metrics.expert_affinity(top1[previous], top1[layer], num_experts)
        results[f"moe/layer{layer}/affinity"] = np.asarray(affinity.conditional)
        results[f"moe/layer{layer}/affinity_predictability"] = float(affinity.predictability)
    return results


def sparsity_results(config: Any, variables: dict[str, Any]) -> dict[str, float]:
    """Per-layer and total sparsity (shares of exact zeros) of the restored params of a pruned
    run: `sparsity/layer{i}`, `sparsity/prunable`, `sparsity/total`; {} when unpruned."""
    from moejax.training.pruning import param_sparsity

    return param_sparsity(config.pruning, variables["params"])


def routing_table(results: dict[str, Any]) -> str:
    """A text table of the per-layer routing statistics in `results`."""
    layers = moe_layers(results)
    if not layers:
        return "(no MoE layers)"
    lines = [
        f"{'layer':>6} {'dropped':>8} {'entropy':>8} {'max/mean':>9} {'experts/tok':>11}"
        f" {'tok.sparse':>10} {'chunk.sparse':>12} {'fluct.':>7} {'affinity':>8}"
        "  expert load fractions"
    ]
    for layer in layers:
        prefix = f"moe/{layer}/"
        load = np.asarray(results[prefix + "expert_load"])
        lines.append(
            f"{layer.removeprefix('layer'):>6} {float(results[prefix + 'dropped_fraction']):8.4f}"
            f" {float(results[prefix + 'routing_entropy']):8.4f}"
            f" {float(results[prefix + 'load_max_over_mean']):9.3f}"
            f" {float(results[prefix + 'active_experts_per_token']):11.2f}"
            f" {float(results[prefix + 'token_sparsity']):10.3f}"
            f" {float(results[prefix + 'chunk_sparsity']):12.3f}"
            f" {_optional(results, prefix + 'routing_fluctuation', 7)}"
            f" {_optional(results, prefix + 'affinity_predictability', 8)}  "
            + " ".join(f"{x:.3f}" for x in load)
        )
    return "\n".join(lines)


def _optional(results: dict[str, Any], name: str, width: int) -> str:
    return f"{float(results[name]):{width}.3f}" if name in results else f"{'-':>{width}}"


def evaluate_workdir(
    workdir: str | Path,
    *,
    step: int | None = None,
    compare_step: int | None = None,
    overrides: Sequence[str] = (),
    devices: Sequence[jax.Device] | None = None,
    sample_bytes: int = 0,
    sample_prompt: bytes = b"\n",
) -> dict[str, Any]:
    """Restores the checkpoint of `workdir` at `step` (default: newest usable) onto the devices
    present, on the mesh of the saved config with `overrides` applied, and evaluates it.

    Only `mesh.*`, `data.*` and `model.moe.dispatch.*` fields (and the halting threshold) may be
    overridden: the model must match the checkpoint.
    With `sample_bytes > 0`, `results["sample"]` holds that many generated bytes after
    `sample_prompt`. Routing fluctuation is measured on the first validation batch against the
    checkpoint at `compare_step` (default: the newest usable one before the evaluated step, if
    any); `results["compare_step"]` names it. A `step` or `compare_step` that is damaged is a
    `CheckpointError`, never replaced by another. Reads only: nothing under the workdir's
    checkpoints is created, moved or deleted, and no lock is taken.
    """
    from moejax import config as config_lib
    from moejax.parallel import sharding
    from moejax.training import corpus
    from moejax.training import state as state_lib
    from moejax.training.checkpoint import CheckpointError
    from moejax.training.restore import read_run, restore_checkpoint
    from moejax.training.step import make_eval_step

    # The dispatch strategy is not state: a mesh with another expert axis needs another one
    # (expert parallelism is named, never inferred from the mesh).
    for override in overrides:
        if not override.startswith(
            ("mesh.", "data.", "model.moe.halting_threshold=", "model.moe.dispatch.")
        ):
            raise config_lib.ConfigError(
                f"eval override {override!r}: only mesh.*, data.*, model.moe.dispatch.* and "
                "model.moe.halting_threshold can change at eval"
            )
    run_config = read_run(workdir)
    config = config_lib.apply_overrides(run_config, overrides)
    devices = list(jax.devices() if devices is None else devices)
    axis_sizes = config_lib.validate(config, len(devices))
    mesh = sharding.make_mesh(axis_sizes, devices)

    layout = state_lib.state_layout(config, mesh)
    target = layout.restore_target()
    restored = restore_checkpoint(workdir, run_config, target, step=step)
    state, restored_step = restored.state, restored.step
    previous_state = None
    if compare_step is not None:
        previous = restore_checkpoint(
            workdir, run_config, target, step=compare_step, asked_as="--compare_step"
        )
        previous_state = previous.state
    else:
        try:
            previous = restore_checkpoint(workdir, run_config, target, before=restored_step)
            if previous is not None:
                previous_state, compare_step = previous.state, previous.step
        except CheckpointError as error:
            # Fluctuation is a comparison, not the evaluation: without a usable earlier
            # checkpoint it is left out.
            log.warning("no routing-fluctuation comparison: %s", error)

    batches = corpus.eval_batches(config.data)
    variables = state_lib.model_variables(state)
    results = evaluate(make_eval_step(layout, mesh), variables, batches)
    results.update(step=restored_step, damaged_steps=sorted(restored.damaged), mesh=axis_sizes)
    results.update(sparsity_results(config, variables))
    if config.model.moe.every:
        fixed_batch = batches[0]
        top1 = routing_top1(layout.spec.merge, mesh, variables, fixed_batch)
        previous_top1 = None
        if previous_state is not None:
            previous_variables = state_lib.model_variables(previous_state)
            previous_top1 = routing_top1(layout.spec.merge, mesh, previous_variables, fixed_batch)
        results.update(routing_dynamics(top1, config.model.moe.num_experts, previous_top1))
        results["compare_step"] = compare_step
    if sample_bytes:
        from moejax.sampling import generate

        sample = generate(
            _one_device_spec(config).merge,
            sharding.to_host(variables),
            sample_prompt,
            num_bytes=sample_bytes,
            window=config.data.seq_len,
        )
        results["sample"] = sample.decode("utf-8", errors="replace")
    return results


def _one_device_spec(config: Config) -> ModelSpec:
    """The model structure for sampling on the host's one device: a dispatch strategy that
    splits the experts over expert shards is replaced by dropless, which computes the same
    function of the same parameters when neither drops an assignment."""
    import dataclasses

    from moejax.config import DispatchConfig
    from moejax.errors import require
    from moejax.training import state as state_lib

    dispatch = config.model.moe.dispatch
    if not dispatch.spec.fits_expert_shards(1):
        require(
            not dispatch.spec.drops,
            "model.moe.dispatch.name",
            dispatch.name,
            "a strategy that runs on one device or drops nothing (sampling runs on one device)",
        )
        moe_config = dataclasses.replace(config.model.moe, dispatch=DispatchConfig.of("dropless"))
        config = dataclasses.replace(
            config, model=dataclasses.replace(config.model, moe=moe_config)
        )
    return state_lib.model_spec(config.model, config.attention)
