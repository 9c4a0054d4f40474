"""Pruning the MoE language model: the train step's use of the chosen pruning method, sparsity
reports per layer, one-shot masks, and DSnoT refinement of the expert weights with
calibration activations.

A driver above the model, so it lives in `training/`: it reads the model's param tree (one
subtree per block under "blocks") and reaches the MoE layers through their public routing hook
(`MoELayer.route`). The math it calls is `moejax.pruning`'s. Params are the train state's pure
dicts; masks are trees like them, held in the optimizer state by `prune_optax`
(`LMPruningConfig` says how).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.errors import message
from moejax.models.moe_layer import MoELayer, RouterContext
from moejax.pruning.config import LMPruningConfig, make_pruner
from moejax.pruning.dsnot import dsnot_experts
from moejax.pruning.masks import (
    ParamFilter,
    apply_masks,
    masked_sparsity,
    path_name,
    prunable_tree,
)
from moejax.pruning.optax_wrapper import Pruner, find_prune_state, replace_prune_state

# `param_regex` of the routed expert weights of the MoE layers; with min_ndim=3 it leaves the
# dense feed-forwards ([d, f], same names) and the shared experts (`shared_w_*`) dense.
EXPERT_WEIGHTS = r"(^|/)ffn/(w_gate|w_up|w_down)$"
EXPERT_MIN_NDIM = 3
# The expert weights DSnoT refines, as `MoELayer` names them.
EXPERT_NAMES = ("w_gate", "w_up", "w_down")


def prunable_params(config: LMPruningConfig, params: Any) -> Any:
    """A tree of Python bools like `params`: which leaves `config` prunes."""
    return prunable_tree(params, ParamFilter(config.param_regex, config.min_ndim))


def with_masks(opt_state: Any, masks: Any) -> Any:
    """`opt_state` (built by `prune_optax`) with its masks replaced by `masks` (like params)."""
    state = find_prune_state(opt_state)
    return replace_prune_state(opt_state, state._replace(masks=masks))


@dataclasses.dataclass(frozen=True)
class LMPruning:
    """What the train step does with a pruning config: the hooks of its method
    (`moejax.pruning.base.MethodSpec`); `prunable` is a tree of Python bools like the params
    (static under jit)."""

    config: LMPruningConfig
    prunable: Any
    pruner: Pruner

    @classmethod
    def create(cls, config: LMPruningConfig, abstract_params: Any) -> LMPruning | None:
        """None when pruning is off; ValueError naming the field when the config cannot prune
        these params (no leaf matches, or a pattern the prunable shapes do not fit)."""
        pruner = make_pruner(config)
        if pruner is None:
            return None
        prunable = prunable_params(config, abstract_params)
        named = jax.tree_util.tree_leaves_with_path(abstract_params)
        if not any(jax.tree.leaves(prunable)):
            raise ValueError(
                f"pruning.param_regex={config.param_regex!r} with pruning.min_ndim="
                f"{config.min_ndim} matches no parameter; allowed: a regex matching some of "
                f"{', '.join(path_name(p) for p, _ in named[:12])}, ..."
            )
        # The pattern checks the shapes it cuts (an n:m axis the group size divides, blocks
        # that tile the matrix) when traced on the abstract params.
        masks = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.bool_), abstract_params)
        try:
            jax.eval_shape(
                lambda p, m: pruner.compute_masks(p, m, config.target_sparsity, jax.random.key(0)),
                abstract_params,
                masks,
            )
        except ValueError as error:
            raise ValueError(
                message(
                    "pruning.pattern.options",
                    config.pattern.options,
                    f"options whose pattern fits the prunable weights ({error})",
                )
            ) from None
        return cls(config, prunable, pruner)

    def forward_params(self, params: Any, opt_state: Any, step: jax.Array) -> Any:
        """The params the forward pass uses (the method's `forward`: the prunable leaves under
        the optimizer-state masks, SR-STE's n:m projection, ...)."""
        masks = find_prune_state(opt_state).masks
        return self.config.method.spec.forward(
            params,
            masks,
            step=step,
            pruner=self.pruner,
            prunable=self.prunable,
            options=self.config.method.options,
        )

    def release(self, opt_state: Any, params: Any) -> Any:
        """Before the optimizer update: the masks `prune_optax` enforces in it (the method's
        `optimizer_masks`; SR-STE's dense weights train, so none is zeroed)."""
        masks = find_prune_state(opt_state).masks
        method = self.config.method
        return with_masks(
            opt_state, method.spec.optimizer_masks(masks, params=params, options=method.options)
        )

    def record(self, opt_state: Any, params: Any) -> Any:
        """After the update (and at init): the masks the optimizer state keeps (the method's
        `record`; SR-STE: the n:m masks of the new weights, which evaluation uses)."""
        masks = find_prune_state(opt_state).masks
        new = self.config.method.spec.record(
            masks,
            params=params,
            pruner=self.pruner,
            prunable=self.prunable,
            options=self.config.method.options,
        )
        return with_masks(opt_state, new)

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


def _block_of(path: tuple) -> int | None:
    """The block index of a leaf under `params["blocks"][i]`, else None."""
    if len(path) >= 2 and getattr(path[0], "key", None) == "blocks":
        return int(getattr(path[1], "key", getattr(path[1], "idx", -1)))
    return None


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
            block = _block_of(path)
            if block is not None:
                groups.append(f"layer{block}")
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
    trained model at once, by `config.score` and `config.pattern`."""
    pruner = make_pruner(config)
    if pruner is None:
        raise ValueError(message("pruning.method.name", config.method.name, "a method that prunes"))
    key = jax.random.key(config.seed)
    return pruner.compute_masks(params, pruner.init_masks(params), config.target_sparsity, key)


# ----------------------------------------------------------------------------- DSnoT

# The router inputs `capture_moe_inputs` can hand `MoELayer.route` outside the forward pass.
CAPTURABLE_NEEDS = ("router_logits", "hidden", "params", "token_ids", "rng", "train")


def moe_layers(model: Any) -> dict[int, tuple[tuple, MoELayer]]:
    """The MoE layers of a TransformerLM by block index: (the layer's path in the model and in
    its params tree, e.g. ("blocks", 1, "ffn"), the layer)."""
    return {
        path[1]: (path, module)
        for path, module in nnx.iter_modules(model)
        if isinstance(module, MoELayer) and len(path) >= 2 and path[0] == "blocks"
    }


def _at(tree: Any, path: tuple) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def capture_moe_inputs(model: Any, tokens: jax.Array) -> dict[int, tuple[jax.Array, jax.Array]]:
    """Runs `model` (a TransformerLM) on `tokens [batch, length]` in evaluation mode and
    returns, for each MoE block i, (its feed-forward input [batch * length, d_model], the
    routing's expert_index [batch * length, top_k]).

    The inputs are the outputs of each block's `ffn_norm`, recorded with `nnx.capture`; the
    routing is the layer's own (`MoELayer.route`). The model is not modified.
    """
    layers = moe_layers(model)
    for layer, (_, moe) in layers.items():
        unsupported = sorted(set(moe.spec.needs) - set(CAPTURABLE_NEEDS))
        if unsupported:
            raise ValueError(
                message(
                    f"model.router.name (block {layer})",
                    moe.spec.name,
                    f"a router needing only {', '.join(CAPTURABLE_NEEDS)} (not {unsupported})",
                )
            )
    forward = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)
    _, outputs = forward(tokens, train=False)
    shared = {}
    if hasattr(model, "router_gru"):
        shared = {name: value[...] for name, value in model.router_gru.items()}
    context = RouterContext(token_ids=tokens, shared_router_params=shared)
    records = {}
    for layer, (path, moe) in layers.items():
        # The block's normalised hidden states, the MoE layer's input: [batch, length, d_model].
        x = _at(outputs, (*path[:-1], "ffn_norm", "__call__")).get_value()[0]
        routing = moe.route(x, context, train=False)
        records[layer] = (x.reshape(-1, x.shape[-1]).astype(moe.dtype), routing.expert_index)
    return records


def dsnot_refine_moe(
    merge: Any,
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
    paths = {layer: path for layer, (path, _) in moe_layers(merge(variables)).items()}
    masks = jax.tree.map(np.asarray, jax.device_get(masks))
    params = jax.device_get(variables["params"])
    reports = {}
    for layer, path in sorted(paths.items()):
        pruned = {**variables, "params": apply_masks(params, masks)}
        captured = [jax.device_get(capture(pruned, tokens)[layer]) for tokens in calibration]
        x = np.concatenate([c[0] for c in captured])  # [tokens, d_model]
        expert_index = np.concatenate([c[1] for c in captured])  # [tokens, top_k]
        ffn, flags, layer_masks = (_at(tree, path) for tree in (params, prunable, masks))
        names = [n for n in EXPERT_NAMES if n in ffn and flags[n]]
        refined, reports[f"layer{layer}"] = dsnot_experts(
            {n: np.asarray(ffn[n], np.float32) for n in EXPERT_NAMES},
            {n: layer_masks[n] for n in EXPERT_NAMES},
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
    "dsnot_refine_moe",
    "layer_sparsity",
    "moe_layers",
    "one_shot_masks",
    "param_sparsity",
    "prunable_params",
    "with_masks",
]
