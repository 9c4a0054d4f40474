"""Post-training fake quantisation of a trained language model's feed-forward weights from
calibration text, block after block: round to nearest, GPTQ, EAQuant or GQSA
(`moejax.quantization`), each a row of `QUANT_METHODS`.

What is quantised: every block's dense MLP, routed experts and shared experts (gate, up, down),
in place, to per-group integer grids (`w_hat = code * scale`, symmetric, one scale per
`group_size` consecutive inputs of an output). Attention, embeddings, norms, the shared
experts' sigmoid gate and every router stay float, except that `mixed=True` gives the routers 8
bits (QuantMoE-Bench's structure-aware allocation, `bit_allocation`: shared experts and router
8 bits, routed experts `bits`; dense MLPs keep `bits`) and EAQuant always quantises its routers
to 8 bits, aligned (its router-logit alignment is defined on a quantised router).

Block i is calibrated on the activations of the model whose blocks before i are already
quantised. Routing-aware, as `moejax.training.calibrated_pruning`: an expert's statistics count
only the tokens its (float) router sends it, and an expert that receives none of them falls
back to round to nearest (nothing to calibrate on). Within a block the down projections are
calibrated on the hidden activations of the already quantised gate and up projections.

EAQuant (Fu et al., "EAQuant: Enhancing Post-Training Quantization for MoE Models via
Expert-Aware Optimization", 2025), per block before its weights are quantised:
1. smoothing (`smooth_block`): scales `s [d_model]` from the block input's channel maxima and
   the largest input-channel weights of the router and every expert's gate and up (a dense MLP:
   its own gate and up, plain SmoothQuant); `1 / s` is folded into the preceding
   `ffn_norm.scale` and `s` into those weights (and the shared experts' gate vector), so the
   float model computes the same function (`smooth_model` applies this alone);
2. GPTQ of the smoothed weights;
3. the router fitted to the float model's logits from the quantised model's inputs
   (`align_router`) on an expert-balanced token selection (`balanced_calibration`: every
   expert gets up to the mean load `tokens * top_k / num_experts` of its tokens), so rarely
   chosen experts weigh as much as frequent ones in the fit.

The report measures router consistency on the final model against the float model on the same
calibration batches: per MoE block the top-k agreement and the router KL of the logits `x @
router` (each model's own block input and router), and for every quantised weight the relative
reconstruction error `||x w - x w_hat|| / ||x w||` on the inputs it was calibrated on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.errors import require
from moejax.models.moe_layer import MoELayer
from moejax.pruning.one_shot import LayerStatistics, accumulate, relative_layer_error
from moejax.quantization import (
    SMOOTHED_VECTORS,
    SMOOTHED_WEIGHTS,
    align_router,
    balanced_calibration,
    bit_allocation,
    channel_absmax,
    dequantize,
    expert_aware_smoothing,
    fake_quant,
    gptq_quantize,
    gqsa,
    router_kl,
    smooth_moe_weights,
    topk_agreement,
)
from moejax.quantization.fake_quant import MAX_BITS, MIN_BITS
from moejax.training.calibration import ffn_inputs, swiglu_hidden

PROJECTIONS = ("w_gate", "w_up", "w_down")
# The bits of routers and shared experts under `mixed`, and of EAQuant's aligned routers.
WIDE_BITS = 8


@dataclasses.dataclass(frozen=True)
class RouterCalibration:
    """What a router quantiser reads for one MoE block: the block inputs `x_float [tokens,
    d_model]` of the float model and `x_quantized` of the model quantised so far (both in the
    block's smoothed coordinates), `expert_index [tokens, top_k]` (the routing of
    `x_quantized`), the layer's `num_experts` and the statistics of `x_quantized`."""

    x_float: jax.Array
    x_quantized: jax.Array
    expert_index: jax.Array
    num_experts: int
    stats: LayerStatistics


# (w [d_in, d_out], its input statistics, bits, group_size, sparsity) -> w_hat [d_in, d_out]
WeightQuantizer = Callable[[jax.Array, LayerStatistics, int, int, float], jax.Array]
# (router [d_model, experts], its calibration, bits, group_size) -> router_hat
RouterQuantizer = Callable[[jax.Array, RouterCalibration, int, int], jax.Array]


@dataclasses.dataclass(frozen=True)
class QuantMethod:
    """One row of `QUANT_METHODS`: how a feed-forward weight and a router are quantised,
    `router_bits` (the routers' bits without `mixed`; None keeps them float), whether the
    block is smoothed first (EAQuant) and whether `sparsity` removes groups (GQSA)."""

    weight: WeightQuantizer
    router: RouterQuantizer
    router_bits: int | None = None
    smooths: bool = False
    removes_groups: bool = False


def _rtn(w, stats, bits, group_size, sparsity):
    del stats, sparsity
    return fake_quant(w, bits, group_size)


def _gptq(w, stats, bits, group_size, sparsity):
    if float(stats.tokens) == 0:
        return _rtn(w, stats, bits, group_size, sparsity)
    return dequantize(gptq_quantize(w, stats.hessian, bits, group_size))


def _gqsa(w, stats, bits, group_size, sparsity):
    sq_norms = stats.sq_norms if float(stats.tokens) > 0 else None
    return gqsa(w, sq_norms, sparsity, bits, group_size)[0]


def _router_rtn(router, calibration, bits, group_size):
    return fake_quant(router, bits, group_size)


def _router_gptq(router, calibration, bits, group_size):
    return _gptq(router, calibration.stats, bits, group_size, 0.0)


def _router_aligned(router, calibration, bits, group_size):
    index = np.asarray(calibration.expert_index)
    quota = math.ceil(index.size / calibration.num_experts)
    chosen = balanced_calibration(index, calibration.num_experts, quota)
    quantized = align_router(
        router,
        calibration.x_float[chosen],
        bits,
        group_size,
        x_quantized=calibration.x_quantized[chosen],
    )
    return dequantize(quantized)


QUANT_METHODS: Mapping[str, QuantMethod] = {
    "rtn": QuantMethod(weight=_rtn, router=_router_rtn),
    "gptq": QuantMethod(weight=_gptq, router=_router_gptq),
    "eaquant": QuantMethod(
        weight=_gptq, router=_router_aligned, router_bits=WIDE_BITS, smooths=True
    ),
    # Routers are rounded, never thinned: every token reads all of the router.
    "gqsa": QuantMethod(weight=_gqsa, router=_router_rtn, removes_groups=True),
}


def _block_inputs(model: Any, calibration: Sequence[np.ndarray], layer: int) -> list:
    return [ffn_inputs(model, jnp.asarray(tokens))[layer] for tokens in calibration]


def _relative_error(w: jax.Array, w_hat: jax.Array, stats: LayerStatistics) -> float | None:
    """`||x w - x w_hat|| / ||x w||` over the tokens `stats` counted, from their Hessian; None
    when there were none."""
    if float(stats.tokens) == 0:
        return None
    return float(jnp.sqrt(relative_layer_error(w, w_hat, stats.hessian)))


def _quantize_swiglu(weights, captured, selected, method, bits, group_size, sparsity):
    """One SwiGLU's `weights` by name (`[d_in, d_out]` each) quantised on the tokens of
    `captured` that `selected(index) -> [tokens] bool` picks (all when None): (the quantised
    weights, each one's relative error, the tokens counted)."""
    d_model, d_ff = weights["w_gate"].shape
    masks = [None if selected is None else selected(index) for _, index in captured]
    stats_in = LayerStatistics.zeros(d_model)
    for (x, _), mask in zip(captured, masks, strict=True):
        stats_in = accumulate(stats_in, x, mask)
    quantized = {
        name: method.weight(weights[name], stats_in, bits, group_size, sparsity)
        for name in ("w_gate", "w_up")
    }
    stats_hidden = LayerStatistics.zeros(d_ff)
    for (x, _), mask in zip(captured, masks, strict=True):
        hidden = swiglu_hidden(x, quantized["w_gate"], quantized["w_up"])
        stats_hidden = accumulate(stats_hidden, hidden, mask)
    quantized["w_down"] = method.weight(weights["w_down"], stats_hidden, bits, group_size, sparsity)
    stats = {"w_gate": stats_in, "w_up": stats_in, "w_down": stats_hidden}
    errors = {n: _relative_error(weights[n], quantized[n], stats[n]) for n in PROJECTIONS}
    return quantized, errors, int(stats_in.tokens)


def _write(variable: nnx.Variable, value: jax.Array) -> None:
    variable[...] = value.astype(variable[...].dtype)


def _quantize_mlp(ffn, captured, method, bits, group_size, sparsity) -> dict[str, Any]:
    weights = {name: getattr(ffn, name)[...].astype(jnp.float32) for name in PROJECTIONS}
    quantized, errors, _ = _quantize_swiglu(
        weights, captured, None, method, bits, group_size, sparsity
    )
    for name in PROJECTIONS:
        _write(getattr(ffn, name), quantized[name])
    return {"bits": bits, "errors": errors}


def _quantize_moe(ffn, captured, float_captured, method, allocation, group_size, sparsity):
    errors: dict[str, Any] = {name: [] for name in PROJECTIONS}
    stacked = {name: getattr(ffn, name)[...].astype(jnp.float32) for name in PROJECTIONS}
    quantized = {name: [] for name in PROJECTIONS}
    tokens_seen = []
    for expert, bits in enumerate(allocation.routed):
        weights = {name: stacked[name][expert] for name in PROJECTIONS}
        done, expert_errors, tokens = _quantize_swiglu(
            weights,
            captured,
            lambda index, e=expert: jnp.any(index == e, axis=1),
            method,
            bits,
            group_size,
            sparsity,
        )
        tokens_seen.append(tokens)
        for name in PROJECTIONS:
            quantized[name].append(done[name])
            errors[name].append(expert_errors[name])
    for name in PROJECTIONS:
        _write(getattr(ffn, name), jnp.stack(quantized[name]))
    for shared in range(ffn.moe.num_shared_experts):
        weights = {
            n: getattr(ffn, f"shared_{n}")[...][shared].astype(jnp.float32) for n in PROJECTIONS
        }
        done, shared_errors, _ = _quantize_swiglu(
            weights, captured, None, method, allocation.shared, group_size, sparsity
        )
        for name in PROJECTIONS:
            variable = getattr(ffn, f"shared_{name}")
            _write(variable, variable[...].at[shared].set(done[name].astype(variable[...].dtype)))
            errors.setdefault(f"shared_{name}", []).append(shared_errors[name])
    if allocation.router is not None:
        x_quantized = jnp.concatenate([x for x, _ in captured])
        stats = accumulate(LayerStatistics.zeros(x_quantized.shape[1]), x_quantized)
        calibration = RouterCalibration(
            x_float=jnp.concatenate([x for x, _ in float_captured]),
            x_quantized=x_quantized,
            expert_index=jnp.concatenate([index for _, index in captured]),
            num_experts=ffn.num_experts,
            stats=stats,
        )
        router = ffn.router[...].astype(jnp.float32)
        router_hat = method.router(router, calibration, allocation.router, group_size)
        _write(ffn.router, router_hat)
        errors["router"] = _relative_error(router, router_hat, stats)
    bits = {"router": allocation.router, "shared": allocation.shared, "routed": allocation.routed}
    return {"bits": bits, "expert_tokens": tokens_seen, "errors": errors}


def _smoothed_params(ffn: nnx.Module) -> dict[str, jax.Array]:
    names = [name for name in SMOOTHED_WEIGHTS + SMOOTHED_VECTORS if hasattr(ffn, name)]
    return {name: getattr(ffn, name)[...] for name in names}


def smoothing_scales_of(block: nnx.Module, inputs: Sequence[jax.Array]) -> jax.Array:
    """EAQuant's smoothing scales `[d_model]` of a block's feed-forward from its inputs `[tokens,
    d_model]` (one array per calibration batch): `expert_aware_smoothing` over the router and
    every expert's gate and up (a dense MLP: its gate and up)."""
    absmax = None
    for x in inputs:
        absmax = channel_absmax(x, absmax)
    return expert_aware_smoothing(_smoothed_params(block.ffn), absmax)[1]


def apply_smoothing(block: nnx.Module, scales: jax.Array) -> None:
    """Divides `block.ffn_norm.scale` by `scales [d_model]` and multiplies the input axis of
    every feed-forward weight that reads the norm's output by them (in place): the block
    computes the same function, up to rounding."""
    params = _smoothed_params(block.ffn)
    for name, value in smooth_moe_weights(params, scales).items():
        _write(getattr(block.ffn, name), value)
    norm = block.ffn_norm.scale
    _write(norm, norm[...] / scales.astype(norm[...].dtype))


def smooth_model(model: Any, calibration: Sequence[np.ndarray]) -> dict[int, np.ndarray]:
    """EAQuant's smoothing alone (the module docstring's step 1) of every block of `model` (a
    `TransformerLM`, changed in place) from the `calibration` token batches `[batch, length]`:
    the float model's logits stay the same up to rounding. Returns each block's scales
    `[d_model]`."""
    _check_calibration(calibration)
    scales = {}
    for layer, block in enumerate(model.blocks):
        inputs = [x for x, _ in _block_inputs(model, calibration, layer)]
        scales[layer] = smoothing_scales_of(block, inputs)
        apply_smoothing(block, scales[layer])
    return {layer: np.asarray(s) for layer, s in scales.items()}


def _check_calibration(calibration: Sequence[np.ndarray]) -> None:
    require(len(calibration) > 0, "calibration", len(calibration), "at least one batch")
    for i, tokens in enumerate(calibration):
        tokens = np.asarray(tokens)
        require(
            tokens.ndim == 2 and np.issubdtype(tokens.dtype, np.integer),
            f"calibration[{i}]",
            f"{tokens.dtype} {tokens.shape}",
            "int token ids [batch, length]",
        )


def _check_model(model: Any, method_name: str, group_size: int) -> None:
    """ValueErrors naming the block unless every feed-forward weight splits into groups of
    `group_size` inputs, every MoE layer has a router weight (its logits are what the report
    compares) and, for a smoothing method, no router reads the hidden states otherwise."""
    for layer, block in enumerate(model.blocks):
        ffn = block.ffn
        names = PROJECTIONS + tuple(
            f"shared_{n}" for n in PROJECTIONS if hasattr(ffn, f"shared_{n}")
        )
        for name in names:
            d_in = getattr(ffn, name)[...].shape[-2]
            require(
                d_in % group_size == 0,
                "group_size",
                group_size,
                f"a positive divisor of blocks[{layer}].ffn.{name}'s d_in={d_in}",
            )
        if not isinstance(ffn, MoELayer):
            continue
        require(
            hasattr(ffn, "router"),
            f"blocks[{layer}].ffn router",
            ffn.spec.name,
            "a router with a [d_model, experts] weight (one whose spec needs router_logits)",
        )
        require(
            not (QUANT_METHODS[method_name].smooths and "hidden" in ffn.spec.needs),
            f"blocks[{layer}].ffn router for method {method_name!r}",
            ffn.spec.name,
            "a router that reads only its logits (smoothing rescales its input)",
        )


def quantize_feed_forwards(
    model: Any,
    calibration: Sequence[np.ndarray],
    *,
    method: str,
    bits: int = 4,
    group_size: int = 32,
    mixed: bool = False,
    sparsity: float = 0.0,
    progress: Callable[[Iterable], Iterable] = iter,
) -> dict[str, Any]:
    """Fake-quantises every block's MLP or experts (gate, up, down; routed and shared) of
    `model` (a `TransformerLM`, changed in place) to `bits` with groups of `group_size` inputs,
    by `method` (a name of `QUANT_METHODS`), from the `calibration` token batches `[batch,
    length]` int, block after block (see the module docstring). Attention and embeddings are
    untouched; routers stay float unless `mixed` (8 bits, and shared experts 8 bits) or the
    method quantises them (EAQuant, 8 bits). `sparsity` is GQSA's share of groups removed;
    `progress` wraps the iteration over the blocks (a progress bar).

    Returns a report: per block ("block0", ...) the bits and each weight's relative
    reconstruction error on its calibration inputs (per expert for a MoE layer: a list, None
    for an expert no calibration token reached), and for a MoE block the calibration tokens
    each expert saw, the top-k agreement and the router KL of the final model's router logits
    against the float model's; "mean_agreement" averages the MoE blocks' agreement (None
    without a MoE block)."""
    require(method in QUANT_METHODS, "method", method, ", ".join(QUANT_METHODS))
    require(
        isinstance(bits, int) and MIN_BITS <= bits <= MAX_BITS,
        "bits",
        bits,
        f"an int in {MIN_BITS}..{MAX_BITS}",
    )
    require(
        isinstance(group_size, int) and group_size >= 1, "group_size", group_size, "an int >= 1"
    )
    require(isinstance(mixed, bool), "mixed", mixed, "True or False")
    chosen = QUANT_METHODS[method]
    require(
        isinstance(sparsity, int | float)
        and (0.0 <= sparsity < 1.0 if chosen.removes_groups else sparsity == 0.0),
        "sparsity",
        sparsity,
        "a share of groups in [0, 1)" if chosen.removes_groups else f"0 (method {method!r})",
    )
    _check_calibration(calibration)
    _check_model(model, method, group_size)
    reference = nnx.clone(model)
    report: dict[str, Any] = {}
    for layer, block in progress(list(enumerate(model.blocks))):
        if chosen.smooths:
            scales = smoothing_scales_of(
                block, [x for x, _ in _block_inputs(model, calibration, layer)]
            )
            apply_smoothing(block, scales)
            apply_smoothing(reference.blocks[layer], scales)
        captured = _block_inputs(model, calibration, layer)
        ffn = block.ffn
        if not isinstance(ffn, MoELayer):
            report[f"block{layer}"] = _quantize_mlp(
                ffn, captured, chosen, bits, group_size, sparsity
            )
            continue
        allocation = bit_allocation(
            ffn.num_experts,
            shared=WIDE_BITS if mixed else bits,
            routed=bits,
            router=WIDE_BITS if mixed else chosen.router_bits,
        )
        float_captured = _block_inputs(reference, calibration, layer)
        report[f"block{layer}"] = _quantize_moe(
            ffn, captured, float_captured, chosen, allocation, group_size, sparsity
        )
    agreements = _router_consistency(model, reference, calibration, report)
    report["mean_agreement"] = float(np.mean(agreements)) if agreements else None
    return report


def _router_consistency(model, reference, calibration, report) -> list[float]:
    """Adds each MoE block's "agreement" and "router_kl" (final vs float router logits on the
    calibration batches) to `report`; returns the agreements."""
    quantized = [ffn_inputs(model, jnp.asarray(tokens)) for tokens in calibration]
    floating = [ffn_inputs(reference, jnp.asarray(tokens)) for tokens in calibration]
    agreements = []
    for layer, block in enumerate(model.blocks):
        if not isinstance(block.ffn, MoELayer):
            continue
        logits_q = jnp.concatenate([r[layer][0] for r in quantized]) @ block.ffn.router[...]
        router_fp = reference.blocks[layer].ffn.router[...]
        logits_fp = jnp.concatenate([r[layer][0] for r in floating]) @ router_fp
        agreement = float(topk_agreement(logits_fp, logits_q, block.ffn.top_k))
        report[f"block{layer}"]["agreement"] = agreement
        report[f"block{layer}"]["router_kl"] = float(router_kl(logits_fp, logits_q))
        agreements.append(agreement)
    return agreements
