"""Expert-level compression of a trained `TransformerLM` from calibration text: fewer experts
per MoE layer (`compress_experts`), or a dense model refactored into experts routed by token id
(`moefy_model`). The math is `moejax.pruning.experts`; this module runs the calibration tokens
through the model, hands each layer's weights and routing to it, and assembles the new model's
config and parameters.

Every statistic comes from the unchanged model in evaluation mode: one forward pass per
calibration batch gives every block's feed-forward input, and each MoE layer's own `route` of
it gives the routing. Layers are compressed independently (not block after block): expert choice
is discrete, and one calibration pass keeps the statistics those of the model that was trained.

- `compress_experts`: every MoE layer keeps `keep` experts. `EXPERT_METHODS` maps each method
  to its layer function: "frequency" and "importance" prune (`prune_experts` by
  `expert_frequency` or `expert_importance`); "mc_smoe" merges the experts into `keep` groups
  (MC-SMoE: `dominant_groups` by router logits, `merge_experts` weighted by frequency,
  `merged_router`). MC-SMoE's "then compress" step (`low_rank_plus_sparse`) is left out: a
  `MoELayer` stores dense expert weights, so a low-rank-plus-sparse fit would save nothing.
- `moefy_model` (Read-ME): every dense MLP becomes a MoE layer of equal slices of its neurons
  (`moefy_ffn`), routed by the "token_table" router (`moejax.routers.token_table`) whose table
  is fitted to each token's oracle experts (`oracle_expert_scores`, `fit_pregating_router`).

The results are pure dicts of the new model's `nnx.Param` state (and `RouterState`), ready for
`nnx.update(TransformerLM(result.config, rngs=...), result.params)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.config import ModelConfig, RouterConfig
from moejax.errors import require
from moejax.models.moe_layer import MoELayer, RouterContext
from moejax.models.transformer import TransformerLM
from moejax.pruning.experts import (
    EXPERT_WEIGHTS,
    dominant_groups,
    expert_frequency,
    expert_importance,
    merge_experts,
    merged_router,
    prune_experts,
)
from moejax.pruning.read_me import (
    fit_pregating_router,
    moefy_ffn,
    oracle_expert_scores,
    pregate,
)
from moejax.routers.base import RouterState

# The context a MoE layer's router may need that a calibration pass can give it outside the
# model's forward (a router reading attention weights or a recurrent state cannot be replayed).
CALIBRATION_NEEDS = (
    "router_logits",
    "hidden",
    "token_ids",
    "rng",
    "train",
    "seq_len",
    "chunk_size",
)


@dataclasses.dataclass(frozen=True)
class ExpertCompression:
    """A compressed model: its `config`, `params` (pure dict of its `nnx.Param` state),
    `router_state` (pure dict of its `RouterState`, empty for routers without state) and a
    `report` (per MoE block `"block{i}"`: what each method decided)."""

    config: ModelConfig
    params: dict[str, Any]
    router_state: dict[str, Any]
    report: dict[str, Any]


class LayerRouting(NamedTuple):
    """One MoE layer's routing of every calibration token: `expert_index [tokens, top_k]`,
    `router_probs [tokens, experts]` and `router_logits [tokens, experts]` (hidden @ router)."""

    expert_index: np.ndarray
    router_probs: np.ndarray
    router_logits: np.ndarray


class CompressedLayer(NamedTuple):
    """A layer method's result: `weights` (`EXPERT_WEIGHTS`, each `[keep, ...]`), `router
    [d_model, keep]`, `source [keep]` (the original expert whose per-expert router state each
    new expert takes) and the layer's `report`."""

    weights: dict[str, np.ndarray]
    router: np.ndarray
    source: np.ndarray
    report: dict[str, Any]


ExpertMethod = Callable[[Mapping[str, np.ndarray], np.ndarray, LayerRouting, int], CompressedLayer]


def _prune_by(score: Callable[[LayerRouting, int], np.ndarray]) -> ExpertMethod:
    def prune(weights, router, routing, keep):
        experts = router.shape[1]
        pruned = prune_experts(weights, router, score(routing, experts), keep)
        return CompressedLayer(
            pruned.weights, pruned.router, pruned.kept, {"kept": pruned.kept.tolist()}
        )

    return prune


def _mc_smoe(weights, router, routing: LayerRouting, keep: int) -> CompressedLayer:
    """MC-SMoE (Li et al., "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its
    Routing Policy", 2024), merging only (see the module docstring)."""
    frequency = expert_frequency(routing.expert_index, router.shape[1])
    groups = dominant_groups(routing.router_logits, frequency, keep)
    merged = merge_experts(weights, groups, frequency)
    report = {"groups": merged.expert_to_group.tolist(), "dominant": merged.dominant.tolist()}
    return CompressedLayer(
        merged.weights, merged_router(router, groups, frequency), merged.dominant, report
    )


# Expert compression methods by name: (expert weights, router, the layer's calibration routing,
# keep) -> the layer's `keep` experts.
EXPERT_METHODS: dict[str, ExpertMethod] = {
    "frequency": _prune_by(
        lambda routing, experts: expert_frequency(routing.expert_index, experts)
    ),
    "importance": _prune_by(lambda routing, experts: expert_importance(routing.router_probs)),
    "mc_smoe": _mc_smoe,
}


def compress_experts(
    model: Any,
    config: ModelConfig,
    calibration: Sequence[np.ndarray],
    *,
    method: str,
    keep: int,
    progress: Callable[[Iterable], Iterable] = iter,
) -> ExpertCompression:
    """Every MoE layer of `model` (a `TransformerLM` of `config`, left unchanged) reduced from
    `config.moe.num_experts` to `keep` experts by `method` (a name of `EXPERT_METHODS`), from
    the routing of the `calibration` token batches `[batch, length]` int32; `progress` wraps the
    iteration over the MoE layers (a progress bar).

    The new config has `moe.num_experts = keep` and `moe.top_k = min(top_k, keep)`; shared
    experts, attention, embeddings and norms are copied. The router must own a logit weight
    (`router [d_model, experts]`, the "router_logits" need), which keeps the chosen columns;
    a per-expert router state (`[experts, ...]`) keeps the rows of each new expert's `source`.
    Report per MoE block `"block{i}"`: `frequency [experts]` (share of the calibration tokens
    routed to each original expert) and the method's decision (`kept`, or `groups` and
    `dominant`).
    """
    require(method in EXPERT_METHODS, "method", method, ", ".join(EXPERT_METHODS))
    experts = config.moe.num_experts
    moe_layers = _moe_layers(config)
    require(bool(moe_layers), "model.moe.every", config.moe.every, "a config with MoE layers")
    require(
        isinstance(keep, int) and 1 <= keep <= experts,
        "keep",
        keep,
        f"an int in [1, model.moe.num_experts={experts}]",
    )
    spec = config.router.spec
    require(
        "router_logits" in spec.needs and spec.init_params is None,
        "model.router.name",
        config.router.name,
        "a router that reads a logit weight (router [d_model, experts]) and owns no other "
        "parameters: the compressed experts keep its columns",
    )
    _check_replayable(config)
    _check_calibration(calibration, config)
    routings = _calibrate(model, calibration, None)[1]
    new_config = dataclasses.replace(
        config,
        moe=dataclasses.replace(config.moe, num_experts=keep, top_k=min(config.moe.top_k, keep)),
    )
    params = _numpy(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    router_state = _numpy(nnx.to_pure_dict(nnx.state(model, RouterState)))
    report = {}
    for layer in progress(list(moe_layers)):
        ffn = params["blocks"][layer]["ffn"]
        routing = routings[layer]
        result = EXPERT_METHODS[method](
            {name: ffn[name] for name in EXPERT_WEIGHTS}, ffn["router"], routing, keep
        )
        ffn.update(result.weights, router=result.router)
        state = router_state.get("blocks", {}).get(layer, {}).get("ffn", {})
        if "router_state" in state:
            value = state["router_state"]
            require(
                value.ndim >= 1 and value.shape[0] == experts,
                f"model.router.name={config.router.name!r} router_state.shape",
                value.shape,
                f"[experts={experts}, ...] (a state per expert)",
            )
            state["router_state"] = value[result.source]
        frequency = expert_frequency(routing.expert_index, experts)
        report[f"block{layer}"] = {"frequency": frequency.tolist(), **result.report}
    _check_matches(params, router_state, new_config)
    return ExpertCompression(new_config, params, router_state, report)


def moefy_model(
    model: Any,
    config: ModelConfig,
    calibration: Sequence[np.ndarray],
    *,
    num_experts: int,
    top_k: int,
    progress: Callable[[Iterable], Iterable] = iter,
) -> ExpertCompression:
    """Read-ME (Cai et al., "Read-ME: Refactorizing LLMs as Router-Decoupled Mixture of Experts
    with System Co-Design", 2024): every dense MLP block of `model` (a `TransformerLM` of
    `config`, whose blocks must all be dense: `model.moe.every = 0`; left unchanged) becomes a
    MoE layer of `num_experts` experts of width `d_ff / num_experts`, its neurons split by
    co-activation over the `calibration` token batches `[batch, length]` int32 (`moefy_ffn`);
    `progress` wraps the iteration over the blocks (a progress bar).

    Each layer is routed by its own "token_table" router, a table `[vocab_size, num_experts]`
    read by token id alone: the mean oracle scores of each id (`oracle_expert_scores`: a token's
    activation mass in each expert's neurons, `fit_pregating_router`), stored as the log of each
    row's shares, so that the softmax of a row is each expert's share of the id's mean
    activation mass (the row's top-k unchanged). The chosen experts weigh 1 each
    (`gate="ones"`): the experts are slices of the dense MLP, whose output is the sum of all of
    them, so with `top_k = num_experts` the model is the dense model again, and with fewer the
    unchosen slices are dropped.

    The new config: `moe.every = 1` (every block a MoE block, no dense layers, no shared
    experts), `num_experts`, `top_k`, `expert_d_ff = d_ff / num_experts`, the dense config's
    dispatch; router "token_table" with `vocab_size` and `gate="ones"`. Report per block
    `"block{i}"`: `partition [experts, d_ff / experts]` (the dense neurons of each expert) and
    `oracle_agreement`, the share of the calibration tokens' `top_k` table choices that are
    among their `top_k` oracle experts.
    """
    layers = range(config.num_layers)
    require(
        not _moe_layers(config),
        "model.moe.every",
        config.moe.every,
        "0: Read-ME refactors a model whose blocks are all dense MLPs",
    )
    d_ff = config.d_ff
    require(
        isinstance(num_experts, int) and num_experts >= 1 and d_ff % num_experts == 0,
        "num_experts",
        num_experts,
        f"an int >= 1 dividing model.d_ff={d_ff}",
    )
    require(
        isinstance(top_k, int) and 1 <= top_k <= num_experts,
        "top_k",
        top_k,
        f"an int in [1, num_experts={num_experts}]",
    )
    _check_replayable(config)
    token_ids = _check_calibration(calibration, config)
    router = RouterConfig.of("token_table", vocab_size=config.vocab_size, gate="ones")
    new_config = dataclasses.replace(
        config,
        moe=dataclasses.replace(
            config.moe,
            every=1,
            num_experts=num_experts,
            top_k=top_k,
            expert_d_ff=d_ff // num_experts,
            dense_layers=(),
            num_shared_experts=0,
            shared_expert_d_ff=0,
            shared_expert_gate=False,
        ),
        router=dataclasses.replace(
            router,
            load_balance_weight=config.router.load_balance_weight,
            router_z_weight=config.router.router_z_weight,
        ),
    )
    params = _numpy(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    report = {}
    for layer in progress(list(layers)):
        ffn = params["blocks"][layer]["ffn"]
        # One block's inputs at a time: all blocks' would be num_layers times the memory.
        x = _calibrate(model, calibration, layer)[0].astype(np.float64)  # [tokens, d_model]
        w_gate, w_up = (ffn[name].astype(np.float64) for name in ("w_gate", "w_up"))
        gate = x @ w_gate
        hidden = gate / (1.0 + np.exp(-gate)) * (x @ w_up)  # [tokens, d_ff]
        moefied = moefy_ffn(ffn["w_gate"], ffn["w_up"], ffn["w_down"], hidden, num_experts)
        oracle = oracle_expert_scores(hidden, moefied.partition)  # [tokens, experts]
        table = _log_shares(
            fit_pregating_router(token_ids, oracle, config.vocab_size, num_experts)
        ).astype(ffn["w_gate"].dtype)
        params["blocks"][layer]["ffn"] = {**moefied.weights, "router_params": {"table": table}}
        chosen = pregate(table, token_ids, top_k)  # [tokens, top_k]
        best = np.argsort(-oracle, axis=1, kind="stable")[:, :top_k]
        agreement = np.mean((chosen[:, :, None] == best[:, None, :]).any(axis=2))
        report[f"block{layer}"] = {
            "partition": moefied.partition.tolist(),
            "oracle_agreement": float(agreement),
        }
    _check_matches(params, {}, new_config)
    return ExpertCompression(new_config, params, {}, report)


def _log_shares(table: np.ndarray) -> np.ndarray:
    """`[vocab, experts]` non-negative scores -> the log of each row's shares (the row's top-k
    unchanged, its softmax the shares); an all-zero row becomes uniform."""
    totals = table.sum(axis=1, keepdims=True)
    shares = np.where(totals > 0, table / np.where(totals > 0, totals, 1.0), 1.0 / table.shape[1])
    # Floor at the smallest share float32 still tells from 0, so no logit is -inf.
    return np.log(np.maximum(shares, np.finfo(np.float32).tiny))


def _moe_layers(config: ModelConfig) -> list[int]:
    return [layer for layer in range(config.num_layers) if config.is_moe_layer(layer)]


def _check_replayable(config: ModelConfig) -> None:
    """ValueError unless one forward pass shows every block each calibration token once and
    each MoE layer's routing can be replayed from its input."""
    for name in ("mod_every", "layer_router_dim"):
        value = getattr(config.depth, name)
        require(
            value == 0,
            f"model.depth.{name}",
            value,
            "0: expert compression calibrates every block on every token",
        )
    lacking = [need for need in config.router.spec.needs if need not in CALIBRATION_NEEDS]
    require(
        not lacking or not _moe_layers(config),
        "model.router.name",
        config.router.name,
        f"a router needing only {', '.join(CALIBRATION_NEEDS)} (it needs {', '.join(lacking)})",
    )


def _check_calibration(calibration: Sequence[np.ndarray], config: ModelConfig) -> np.ndarray:
    """The calibration token ids flattened `[tokens]` int64, after checking the batches."""
    require(len(calibration) > 0, "calibration", len(calibration), "at least one batch")
    for i, batch in enumerate(calibration):
        batch = np.asarray(batch)
        require(
            batch.ndim == 2 and np.issubdtype(batch.dtype, np.integer) and batch.size > 0,
            f"calibration[{i}]",
            f"{batch.dtype}{list(batch.shape)}",
            "int tokens [batch, length]",
        )
        require(
            batch.min() >= 0 and batch.max() < config.vocab_size,
            f"calibration[{i}]",
            f"ids in [{batch.min()}, {batch.max()}]",
            f"ids in [0, model.vocab_size={config.vocab_size})",
        )
    return np.concatenate([np.asarray(batch).reshape(-1) for batch in calibration]).astype(np.int64)


def _forward(model: Any, tokens: jax.Array):
    """Every block's feed-forward input `[tokens, d_model]` float32 and, for each MoE block,
    (expert_index, router_probs, router_logits) of its own routing, in evaluation mode."""
    forward = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)
    _, outputs = forward(tokens, train=False)
    inputs, routings = [], {}
    for layer, block in enumerate(model.blocks):
        x = outputs["blocks"][layer]["ffn_norm"]["__call__"].get_value()[0]
        flat = x.reshape(-1, x.shape[-1]).astype(jnp.float32)  # [tokens, d_model]
        inputs.append(flat)
        if isinstance(block.ffn, MoELayer):
            routing = block.ffn.route(x, RouterContext(token_ids=tokens), train=False)
            logits = flat @ block.ffn.router[...].astype(jnp.float32)  # [tokens, experts]
            routings[layer] = (routing.expert_index, routing.router_probs, logits)
    return inputs, routings


_FORWARD = nnx.jit(_forward)


def _calibrate(
    model: Any, calibration: Sequence[np.ndarray], layer: int | None
) -> tuple[np.ndarray | None, dict[int, LayerRouting]]:
    """Over every calibration batch, in batch order: block `layer`'s feed-forward input
    `[tokens, d_model]` (None for `layer=None`) and every MoE block's `LayerRouting`."""
    inputs, routings = [], []
    for batch in calibration:
        batch_inputs, batch_routings = _FORWARD(model, jnp.asarray(batch, jnp.int32))
        if layer is not None:
            inputs.append(np.asarray(batch_inputs[layer]))
        routings.append(jax.device_get(batch_routings))
    merged = {
        block: LayerRouting(*(np.concatenate([r[block][i] for r in routings]) for i in range(3)))
        for block in routings[0]
    }
    return (None if layer is None else np.concatenate(inputs)), merged


def _numpy(tree: Any) -> Any:
    """A pure dict with numpy leaves (copies, so the model is never written through)."""
    return jax.tree.map(lambda leaf: np.array(leaf), tree)


def _check_matches(params: dict, router_state: dict, config: ModelConfig) -> None:
    """Asserts `params` and `router_state` have exactly the structure, shapes and dtypes of a
    `TransformerLM(config)`'s, so that they load into one."""
    abstract = nnx.eval_shape(lambda: TransformerLM(config, rngs=nnx.Rngs(0)))
    for kind, built in ((nnx.Param, params), (RouterState, router_state)):
        expected = nnx.to_pure_dict(nnx.state(abstract, kind))
        shapes = jax.tree.map(lambda leaf: (leaf.shape, jnp.dtype(leaf.dtype)), expected)
        got = jax.tree.map(lambda leaf: (leaf.shape, jnp.dtype(leaf.dtype)), built)
        if got != shapes:
            raise AssertionError(f"compressed {kind.__name__}: {got}; a TransformerLM's: {shapes}")
