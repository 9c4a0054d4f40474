"""Pruning of the MoE language model: how the train step uses the masks (masked or SR-STE),
sparsity reports per layer, and training-free DSnoT refinement of the expert weights with
calibration activations.

Params are the train state's pure dicts (`params["blocks"][i]["ffn"]["w_gate"]`); masks are
trees like them, held in the optimizer state by `prune_optax` (`LMPruningConfig` says how).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax.pruning import nm
from moejax.pruning.config import LMPruningConfig, make_pruner
from moejax.pruning.dsnot import dsnot
from moejax.pruning.masks import (
    ParamFilter,
    apply_masks,
    masked_sparsity,
    ones_masks,
    path_name,
    prunable_tree,
)
from moejax.pruning.optax_wrapper import find_prune_state, replace_prune_state

# `param_regex` of the routed expert weights of the MoE layers; with min_ndim=3 it leaves the
# dense feed-forwards ([d, f], same names) and the shared experts (`shared_w_*`) dense.
EXPERT_WEIGHTS = r"(^|/)ffn/(w_gate|w_up|w_down)$"
EXPERT_MIN_NDIM = 3
_LAYER = re.compile(r"^blocks/(\d+)/")


def prunable_params(config: LMPruningConfig, params: Any) -> Any:
    """A tree of Python bools like `params`: which leaves `config` prunes."""
    return prunable_tree(params, ParamFilter(config.param_regex, config.min_ndim))


def with_masks(opt_state: Any, masks: Any) -> Any:
    """`opt_state` (built by `prune_optax`) with its masks replaced by `masks` (like params)."""
    state = find_prune_state(opt_state)
    return replace_prune_state(opt_state, state._replace(masks=masks))


@dataclasses.dataclass(frozen=True)
class LMPruning:
    """What the train step does with a pruning config; `prunable` is a tree of Python bools
    like the params (static under jit)."""

    config: LMPruningConfig
    prunable: Any

    @classmethod
    def create(cls, config: LMPruningConfig, abstract_params: Any) -> LMPruning | None:
        """None when pruning is off; ValueError naming the field when the config cannot prune
        these params (no leaf matches, or an n:m axis the group size does not divide)."""
        if not config.enabled:
            return None
        prunable = prunable_params(config, abstract_params)
        named = jax.tree_util.tree_leaves_with_path(abstract_params)
        chosen = [
            (path_name(path), leaf)
            for (path, leaf), keep in zip(named, jax.tree.leaves(prunable), strict=True)
            if keep
        ]
        if not chosen:
            raise ValueError(
                f"pruning.param_regex={config.param_regex!r} with pruning.min_ndim="
                f"{config.min_ndim} matches no parameter; allowed: a regex matching some of "
                f"{', '.join(path_name(p) for p, _ in named[:12])}, ..."
            )
        if config.pattern == "nm":
            for name, leaf in chosen:
                axis = config.nm_axis
                if not -leaf.ndim <= axis < leaf.ndim or leaf.shape[axis] % config.m:
                    raise ValueError(
                        f"pruning.nm_axis={axis}: {name} has shape {leaf.shape}; allowed: an "
                        f"axis whose size is a multiple of pruning.m={config.m}"
                    )
        return cls(config, prunable)

    @property
    def srste(self) -> bool:
        return self.config.mode == "srste"

    def flow(self, step: jax.Array) -> jax.Array:
        """β of progressive gradient flow at `step` (1 when the decay is off)."""
        config = self.config
        if config.flow_end <= config.flow_begin:
            return jnp.float32(1.0)
        return nm.gradient_flow_decay(
            step, begin=config.flow_begin, end=config.flow_end, intervals=config.flow_intervals
        )

    def forward_params(self, params: Any, opt_state: Any, step: jax.Array) -> Any:
        """The params the forward pass uses: SR-STE's n:m projection (custom gradient) or the
        prunable leaves under the optimizer-state masks (zero gradient to pruned weights)."""
        config = self.config
        if self.srste:
            return nm.srste_params(
                params,
                self.prunable,
                n=config.n,
                m=config.m,
                axis=config.nm_axis,
                decay=config.srste_decay,
                flow=self.flow(step),
            )
        masks = find_prune_state(opt_state).masks
        return jax.tree.map(
            lambda p, m, keep: jnp.where(m, p, jnp.zeros((), p.dtype)) if keep else p,
            params,
            masks,
            self.prunable,
        )

    def release(self, opt_state: Any, params: Any) -> Any:
        """Before the optimizer update. SR-STE trains the dense weights, so `prune_optax` must
        not zero the pruned ones: it sees all-kept masks. Masked mode: unchanged."""
        return with_masks(opt_state, ones_masks(params)) if self.srste else opt_state

    def record(self, opt_state: Any, params: Any) -> Any:
        """After the update (and at init). SR-STE: the optimizer state holds the n:m masks of
        the new weights, the ones the next forward pass uses (checkpointed, evaluated)."""
        if not self.srste:
            return opt_state
        config = self.config
        masks = nm.nm_masks(params, self.prunable, n=config.n, m=config.m, axis=config.nm_axis)
        return with_masks(opt_state, masks)

    def metrics(self, opt_state: Any) -> dict[str, jax.Array]:
        """`pruning/sparsity`: pruned share of the prunable weights (traced, cheap)."""
        masks = find_prune_state(opt_state).masks
        return {"pruning/sparsity": masked_sparsity(masks, self.prunable)}


def deployed_params(params: Any, opt_state: Any) -> Any:
    """The params with the optimizer-state masks applied: what evaluation and sampling use.
    Params unchanged when the optimizer holds no masks (pruning off)."""
    try:
        state = find_prune_state(opt_state)
    except ValueError:
        return params
    return apply_masks(params, state.masks)


def layer_sparsity(params: Any, prunable: Any) -> dict[str, float]:
    """Shares of exactly-zero entries: `sparsity/layer{i}` over the prunable weights of block
    i, `sparsity/prunable` over all prunable weights, `sparsity/total` over all params.

    params: the (masked) params tree; prunable: a tree of Python bools like it.
    """
    zeros, sizes = {}, {}
    named = jax.tree_util.tree_leaves_with_path(params)
    counts = jax.device_get([jnp.sum(jnp.asarray(leaf) == 0) for _, leaf in named])
    for (path, leaf), count, keep in zip(named, counts, jax.tree.leaves(prunable), strict=True):
        groups = ["total"]
        if keep:
            groups.append("prunable")
            layer = _LAYER.match(path_name(path))
            if layer is not None:
                groups.append(f"layer{layer.group(1)}")
        for group in groups:
            zeros[group] = zeros.get(group, 0) + int(count)
            sizes[group] = sizes.get(group, 0) + int(np.size(leaf))
    layers = sorted((g for g in zeros if g.startswith("layer")), key=lambda g: int(g[5:]))
    return {f"sparsity/{g}": zeros[g] / max(sizes[g], 1) for g in [*layers, "prunable", "total"]}


def param_sparsity(config: LMPruningConfig, params: Any) -> dict[str, float]:
    """`layer_sparsity` of `params` for a run pruned by `config`; {} when pruning is off."""
    if not config.enabled:
        return {}
    return layer_sparsity(params, prunable_params(config, params))


def one_shot_masks(config: LMPruningConfig, params: Any) -> Any:
    """Masks (like params) that prune `config.target_sparsity` of the prunable weights of a
    trained model at once, by `config.method` and `config.pattern`."""
    pruner = make_pruner(config)
    if pruner is None:
        raise ValueError("config.method='none': one_shot_masks needs a pruning method.")
    key = jax.random.key(config.seed)
    return pruner.compute_masks(params, pruner.init_masks(params), config.target_sparsity, key)


# ----------------------------------------------------------------------------- DSnoT


def capture_moe_inputs(model: Any, tokens: jax.Array) -> dict[int, tuple[jax.Array, jax.Array]]:
    """Runs `model` (a TransformerLM) on `tokens [batch, length]` in evaluation mode and
    returns, for each MoE block i, (its feed-forward input [batch * length, d_model], the
    routing's expert_index [batch * length, top_k]). Replaces the blocks' `ffn` of this
    model instance by recording wrappers, so pass a throw-away instance."""
    records: dict[int, tuple[jax.Array, jax.Array]] = {}

    def recording(layer: int, ffn: Any) -> Callable:
        def call(x, context=None, *, train=True):
            batch, length, d_model = x.shape
            tokens_in = x.reshape(batch * length, d_model).astype(ffn.dtype)
            routing, _ = ffn._route(tokens_in, context, train=train, length=length)
            records[layer] = (tokens_in, routing.expert_index)
            return ffn(x, context, train=train)

        return call

    for layer, block in enumerate(model.blocks):
        if block.is_moe:
            block.ffn = recording(layer, block.ffn)
    model(tokens, train=False)
    return records


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def moment_rows(x: np.ndarray) -> np.ndarray:
    """Two rows, mean - std and mean + std per feature: x [tokens, d] -> [2, d].

    `dsnot` reads its inputs only through the per-feature mean, variance and norm. These two
    rows have the same mean and variance, and norms sqrt(2 / tokens) times the true ones for
    every feature, which changes no choice DSnoT makes (the norms are compared within a
    column). So every expert's refinement has the same static shapes and compiles once.
    """
    x64 = np.asarray(x, np.float64)
    mean, std = x64.mean(axis=0), x64.std(axis=0)
    return np.stack([mean - std, mean + std]).astype(np.float32)


@jax.jit(static_argnames="max_cycles")
def _dsnot(w: jax.Array, mask: jax.Array, x: jax.Array, max_cycles: int):
    result = dsnot(w, mask, x, max_cycles=max_cycles)
    return result.mask, jnp.sum(result.error_before), jnp.sum(result.error_after), result.swaps


def dsnot_experts(
    weights: dict[str, np.ndarray],
    masks: dict[str, np.ndarray],
    x: np.ndarray,
    expert_index: np.ndarray,
    *,
    refine: Iterable[str] = ("w_gate", "w_up", "w_down"),
    max_cycles: int = 50,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """DSnoT on every expert of one MoE layer, each with the calibration tokens routed to it.

    *Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs.* weights:
    {"w_gate", "w_up": [experts, d_model, d_ff], "w_down": [experts, d_ff, d_model]}; masks:
    bool, the same shapes; x: [tokens, d_model] the layer's feed-forward inputs;
    expert_index: [tokens, top_k]. w_gate and w_up see the tokens routed to the expert; w_down
    sees the expert's hidden activation computed with the refined w_gate and w_up masks, as
    the sparse model will. Only the names in `refine` change; an expert with fewer than two
    routed tokens keeps its masks. Returns (new masks, report of the summed |ε| over all
    columns before and after, and the number of swaps).
    """
    new = {name: np.array(mask, dtype=bool) for name, mask in masks.items()}
    report = {"error_before": 0.0, "error_after": 0.0, "swaps": 0.0}

    def refine_one(name: str, expert: int, inputs: np.ndarray) -> None:
        w = jnp.asarray(weights[name][expert], jnp.float32)
        mask, before, after, swaps = _dsnot(
            w, jnp.asarray(new[name][expert]), jnp.asarray(moment_rows(inputs)), max_cycles
        )
        new[name][expert] = np.asarray(mask)
        report["error_before"] += float(before)
        report["error_after"] += float(after)
        report["swaps"] += float(jnp.sum(swaps))

    for expert in range(weights["w_gate"].shape[0]):
        rows = np.any(expert_index == expert, axis=1)
        inputs = np.asarray(x[rows], np.float32)  # [tokens routed to the expert, d_model]
        if inputs.shape[0] < 2:
            continue
        for name in ("w_gate", "w_up"):
            if name in refine:
                refine_one(name, expert, inputs)
        if "w_down" in refine:
            gate = inputs @ np.where(new["w_gate"][expert], weights["w_gate"][expert], 0.0)
            up = inputs @ np.where(new["w_up"][expert], weights["w_up"][expert], 0.0)
            refine_one("w_down", expert, _silu(gate) * up)  # [tokens, d_ff]
    return new, report


def dsnot_refine_moe(
    merge: Callable[[dict[str, Any]], Any],
    variables: dict[str, Any],
    masks: Any,
    prunable: Any,
    calibration: list[np.ndarray],
    *,
    max_cycles: int = 50,
) -> tuple[Any, dict[str, dict[str, float]]]:
    """Refines the expert masks of every MoE layer with DSnoT, layer after layer.

    merge: variables -> TransformerLM (`ModelSpec.merge`); variables: {"params",
    "router_state"} (dense params); masks, prunable: trees like the params; calibration:
    token batches [batch, length] from the training split. Layer i's inputs come from the
    model with every earlier layer already pruned and refined (the sparse model's own
    activations). No gradients. Returns (masks, {"layer{i}": report of `dsnot_experts`}).
    """
    capture = jax.jit(lambda v, tokens: capture_moe_inputs(merge(v), tokens))
    masks = jax.tree.map(np.asarray, jax.device_get(masks))
    params = jax.device_get(variables["params"])
    reports = {}
    for layer in sorted(capture.eval_shape(variables, calibration[0])):
        pruned = {**variables, "params": apply_masks(params, masks)}
        captured = [jax.device_get(capture(pruned, tokens)[layer]) for tokens in calibration]
        x = np.concatenate([c[0] for c in captured])  # [tokens, d_model]
        expert_index = np.concatenate([c[1] for c in captured])  # [tokens, top_k]
        ffn = params["blocks"][layer]["ffn"]
        flags = prunable["blocks"][layer]["ffn"]
        names = [n for n in ("w_gate", "w_up", "w_down") if n in ffn and flags[n]]
        layer_masks = masks["blocks"][layer]["ffn"]
        refined, reports[f"layer{layer}"] = dsnot_experts(
            {n: np.asarray(ffn[n], np.float32) for n in ("w_gate", "w_up", "w_down")},
            {n: layer_masks[n] for n in ("w_gate", "w_up", "w_down")},
            x,
            expert_index,
            refine=names,
            max_cycles=max_cycles,
        )
        layer_masks.update({n: refined[n] for n in names})
    return masks, reports


__all__ = [
    "EXPERT_MIN_NDIM",
    "EXPERT_WEIGHTS",
    "LMPruning",
    "capture_moe_inputs",
    "deployed_params",
    "dsnot_experts",
    "dsnot_refine_moe",
    "layer_sparsity",
    "moment_rows",
    "one_shot_masks",
    "param_sparsity",
    "prunable_params",
    "with_masks",
]
