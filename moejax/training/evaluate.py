"""The evaluation the training loop runs every `eval_every` steps: validation loss, bits per
byte and per-layer routing statistics of the current parameters over the validation batches.

Evaluating a saved run (restore a workdir's checkpoint, compare with an earlier one, sample)
is `moejax.evaluation`, which builds on this module; nothing here imports it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from matplotlib.figure import Figure

from moejax import plotting
from moejax.training.step import MeshStep, global_batch


def evaluate(
    eval_step: MeshStep, variables: Any, batches: Iterable[dict[str, np.ndarray]]
) -> dict[str, Any]:
    """Runs `eval_step` over `batches`; returns a dict of floats and per-expert arrays.

    `loss` is the mean next-token negative log-likelihood in nats, `bits_per_byte` the same in
    bits (per byte on the byte corpus; per token with `data.tokenizer`), `perplexity`
    exp(loss); routing
    statistics (`moe/layer{i}/...`) are averaged over batches.
    """
    nll, tokens, routing_sums, count = 0.0, 0.0, {}, 0
    for batch in batches:
        out = jax.device_get(eval_step(variables, global_batch(eval_step.mesh, batch)))
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
    halted = [value for name, value in results.items() if name.endswith("/halted_fraction")]
    if halted:
        # Every MoE layer costs the same, so the saved share of MoE FLOPs is the mean halted share.
        results["moe_flops_halted"] = float(np.mean(halted))
    return results


def moe_layers(results: dict[str, Any]) -> list[str]:
    """Names (`layer{i}`) of the MoE layers reported in `results`, in depth order."""
    layers = {name.split("/")[1] for name in results if name.startswith("moe/")}
    return sorted(layers, key=lambda layer: int(layer.removeprefix("layer")))


def expert_load_matrix(results: dict[str, Any]) -> np.ndarray:
    """`[moe layers, experts]` expert load fractions from `results`."""
    loads = [np.asarray(results[f"moe/{layer}/expert_load"]) for layer in moe_layers(results)]
    return np.stack(loads)


def expert_load_figure(results: dict[str, Any], step: int) -> Figure | None:
    """The expert-load heatmap of `results` (rows: MoE layers by index); None with no MoE layer."""
    layers = moe_layers(results)
    if not layers:
        return None
    return plotting.load_heatmap(
        expert_load_matrix(results),
        layer_names=[layer.removeprefix("layer") for layer in layers],
        title=f"Expert load on the validation batches, step {step}",
    )
