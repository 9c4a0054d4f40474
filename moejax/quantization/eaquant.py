"""EAQuant's three expert-aware steps for post-training quantisation of a MoE layer (Fu et al.,
"EAQuant: Enhancing Post-Training Quantization for MoE Models via Expert-Aware Optimization",
2025), on moejax's MoE weights: `router [d_model, experts]`, stacked `w_gate, w_up [experts,
d_model, d_ff]`, `w_down [experts, d_ff, d_model]`, `shared_w_*` likewise, `shared_gate
[d_model]`.

1. Expert-aware smoothing aggregation. SmoothQuant (Xiao et al., "SmoothQuant: Accurate and
   Efficient Post-Training Quantization for Large Language Models", 2023) moves activation
   outliers into the weights with per-input-channel scales `s = max|x|^α / max|w|^(1-α)`:
   `x @ w = (x / s) @ (s[:, None] * w)`. A MoE layer's input feeds the router and every expert,
   so one `s` serves them all and its weight side is the maximum over all of them; the layer
   is exactly the same function before quantisation.
2. Router-logit distribution alignment. A quantised router can send tokens to other experts;
   fitting the quantised router's logits to the float router's on calibration tokens (a
   least-squares float correction, then GPTQ rounding, kept only when it lowers
   `KL(softmax(fp logits) || softmax(quantised logits))`) keeps the choices.
3. Expert-balanced calibration. Rarely chosen experts see few calibration tokens; choosing the
   tokens so that every expert gets up to a quota gives each expert's statistics enough rows.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moejax.errors import require
from moejax.quantization.fake_quant import (
    QuantizedWeight,
    _quantize,
    check_quantization,
    dequantize,
)
from moejax.quantization.gptq import _gptq

# The MoE weights whose input is the layer's input x (axis -2 is d_model): they take `s`.
SMOOTHED_WEIGHTS = ("router", "w_gate", "w_up", "shared_w_gate", "shared_w_up")
# The shared experts' sigmoid gate `[d_model]` also reads x, so it takes `s` too; it stays float
# and does not enter the weight maximum.
SMOOTHED_VECTORS = ("shared_gate",)


def channel_absmax(x: jax.Array, running: jax.Array | None = None) -> jax.Array:
    """`[d_model]` `max_t |x_t|` of `x [tokens, d_model]` (float32 at least), folded into
    `running` (the same of earlier calibration batches) when given."""
    absmax = jnp.max(jnp.abs(x.astype(jnp.promote_types(x.dtype, jnp.float32))), axis=0)
    return absmax if running is None else jnp.maximum(running, absmax)


def smoothing_scales(
    act_absmax: jax.Array, weights: Sequence[jax.Array], alpha: float = 0.5
) -> jax.Array:
    """Expert-aware smoothing scales `s [d_model] = act_absmax^α / w_absmax^(1-α)`, where
    `w_absmax [d_model]` is the largest |w| of input channel i over every weight of `weights`
    (each `[..., d_model, d_out]`: the router and all experts' `w_gate`, `w_up`), its leading
    axes and its outputs. Channels that never fire or have no weight keep `s = 1`. The input is
    divided by `s` and the weights multiplied by `s[:, None]` (`smooth_moe_weights`)."""
    shape = getattr(act_absmax, "shape", None)
    require(getattr(act_absmax, "ndim", None) == 1, "act_absmax.shape", shape, "[d_model]")
    d_model = shape[0]
    require(0.0 <= alpha <= 1.0, "alpha", alpha, "a migration strength in [0, 1]")
    require(len(weights) > 0, "weights", weights, "at least one [..., d_model, d_out] weight")
    for i, w in enumerate(weights):
        require(
            w.ndim >= 2 and w.shape[-2] == d_model,
            f"weights[{i}].shape",
            w.shape,
            f"[..., d_model={d_model}, d_out]",
        )
    per_weight = [
        jnp.max(jnp.abs(jnp.moveaxis(w, -2, 0)).reshape(d_model, -1), axis=1) for w in weights
    ]
    w_absmax = functools.reduce(jnp.maximum, per_weight).astype(act_absmax.dtype)  # [d_model]
    usable = (act_absmax > 0) & (w_absmax > 0)
    scales = jnp.power(act_absmax, alpha) / jnp.power(w_absmax, 1.0 - alpha)
    return jnp.where(usable, scales, 1.0)


def smooth_moe_weights(params: Mapping[str, jax.Array], scales: jax.Array) -> dict[str, jax.Array]:
    """`params` (a MoE layer's weights by name) with every weight that reads the layer's input
    multiplied by `scales [d_model]` on its input axis (`SMOOTHED_WEIGHTS`, `SMOOTHED_VECTORS`);
    the others (`w_down`, ...) unchanged. With the input divided by `scales` the layer computes
    the same function (the driver folds `1 / scales` into the norm before the layer)."""
    smoothed = dict(params)
    for name in SMOOTHED_WEIGHTS + SMOOTHED_VECTORS:
        if name not in params:
            continue
        w = params[name]
        shape = getattr(w, "shape", None)
        require(
            shape is not None and shape[-2 if name in SMOOTHED_WEIGHTS else -1] == scales.shape[0],
            f"params[{name!r}].shape",
            shape,
            f"d_model={scales.shape[0]} on the input axis",
        )
        factor = scales[:, None] if name in SMOOTHED_WEIGHTS else scales
        smoothed[name] = (w * factor.astype(w.dtype)).astype(w.dtype)
    return smoothed


def expert_aware_smoothing(
    params: Mapping[str, jax.Array], act_absmax: jax.Array, alpha: float = 0.5
) -> tuple[dict[str, jax.Array], jax.Array]:
    """EAQuant's smoothing aggregation of one MoE layer: `(smoothed params, scales [d_model])`
    from its weights by name and the layer input's `act_absmax [d_model]`; the weight maximum
    runs over every `SMOOTHED_WEIGHTS` entry present. Feed the layer `x / scales`."""
    present = [params[name] for name in SMOOTHED_WEIGHTS if name in params]
    scales = smoothing_scales(act_absmax, present, alpha)
    return smooth_moe_weights(params, scales), scales


def router_kl(logits_fp: jax.Array, logits_q: jax.Array, temperature: float = 1.0) -> jax.Array:
    """Mean over tokens of `KL(softmax(logits_fp / T) || softmax(logits_q / T))`, float32,
    from `[tokens, experts]` logits."""
    log_p = jax.nn.log_softmax(logits_fp.astype(jnp.float32) / temperature, axis=-1)
    log_q = jax.nn.log_softmax(logits_q.astype(jnp.float32) / temperature, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6, 7))
def _align_router(router, x, x_quantized, bits, group_size, symmetric, ridge, damp):
    highest = jax.lax.Precision.HIGHEST
    target = jnp.matmul(x, router, precision=highest)  # [tokens, experts]
    hessian = jnp.matmul(x_quantized.T, x_quantized, precision=highest)  # [d_model, d_model]
    d_model = router.shape[0]
    strength = ridge * jnp.trace(hessian) / d_model + jnp.finfo(router.dtype).tiny
    system = hessian + strength * jnp.eye(d_model, dtype=router.dtype)
    rhs = jnp.matmul(x_quantized.T, target, precision=highest) + strength * router
    corrected = jnp.linalg.solve(system, rhs)  # [d_model, experts]
    candidates = (
        _quantize(router, bits, group_size, symmetric),
        _gptq(corrected, hessian, bits, group_size, symmetric, damp),
    )
    kls = [
        router_kl(target, jnp.matmul(x_quantized, dequantize(q), precision=highest))
        for q in candidates
    ]
    # Never hand back a router worse on the calibration tokens than plain rounding.
    return jax.tree.map(lambda a, b: jnp.where(kls[1] <= kls[0], b, a), *candidates)


def align_router(
    router: jax.Array,
    x: jax.Array,
    bits: int,
    group_size: int,
    *,
    x_quantized: jax.Array | None = None,
    symmetric: bool = True,
    ridge: float = 1e-3,
    damp: float = 0.01,
) -> QuantizedWeight:
    """EAQuant's router-logit alignment: a quantised `router [d_model, experts]` whose logits
    on the calibration tokens stay close to the float router's, so tokens keep their experts.

    `x [tokens, d_model]` are the layer's calibration inputs in the float model, `x_quantized`
    the same tokens' inputs in the quantised model (its earlier layers and activation
    quantisation move them; default `x`). Two closed-form steps fit the quantised logits
    `x_quantized @ Q` to the float logits `x @ router`:
    1. a float correction, the ridge least-squares fit `argmin_V ||x_quantized V - x router||²
       + λ ||V - router||²` with `λ = ridge * mean(diag H)` (`V = router` when the inputs are
       the same);
    2. GPTQ rounding of `V` with the Hessian `H = x_quantizedᵀ x_quantized` (`gptq_quantize`),
       which keeps `x_quantized @ Q` close to `x_quantized @ V`.
    The result is compared with plain rounding by `router_kl` on the calibration tokens, and
    plain rounding is returned when it is no worse. (Training the correction by gradient on the
    KL through a straight-through quantiser, the paper's loss, flipped many codes at once and
    raised the KL on small routers.)
    """
    check_quantization(router, bits, group_size)
    require(router.ndim == 2, "router.shape", router.shape, "[d_model, experts]")
    shape = getattr(x, "shape", None)
    require(
        getattr(x, "ndim", None) == 2 and shape[1] == router.shape[0],
        "x.shape",
        shape,
        f"[tokens, d_model={router.shape[0]}]",
    )
    x_quantized = x if x_quantized is None else x_quantized
    require(x_quantized.shape == shape, "x_quantized.shape", x_quantized.shape, f"x's {shape}")
    require(ridge > 0, "ridge", ridge, "> 0")
    require(damp > 0, "damp", damp, "> 0")
    dtype = jnp.promote_types(router.dtype, jnp.float32)
    return _align_router(
        router.astype(dtype),
        x.astype(dtype),
        x_quantized.astype(dtype),
        bits,
        group_size,
        bool(symmetric),
        float(ridge),
        float(damp),
    )


def balanced_calibration(
    expert_index: jax.Array | np.ndarray, num_experts: int, per_expert: int
) -> np.ndarray:
    """EAQuant's expert-balanced calibration: sorted int64 indices of calibration tokens such
    that every expert is chosen by at least `min(per_expert, tokens routed to it)` of them.

    `expert_index [tokens, top_k]` holds each token's chosen experts. Experts are served from
    the rarest up, each with its earliest tokens not yet taken, counting the tokens already
    taken for other experts that also chose it, so frequent experts mostly ride along and the
    selection stays small. A token counts once per expert however often it lists it.
    """
    expert_index = np.asarray(expert_index)
    require(expert_index.ndim == 2, "expert_index.shape", expert_index.shape, "[tokens, top_k]")
    require(
        isinstance(num_experts, int) and num_experts >= 1, "num_experts", num_experts, "an int >= 1"
    )
    require(
        expert_index.size == 0 or (expert_index.min() >= 0 and expert_index.max() < num_experts),
        "expert_index",
        f"values in [{expert_index.min()}, {expert_index.max()}]" if expert_index.size else "",
        f"expert ids in 0..{num_experts - 1}",
    )
    require(
        isinstance(per_expert, int) and per_expert >= 0, "per_expert", per_expert, "an int >= 0"
    )
    routed = np.zeros((expert_index.shape[0], num_experts), bool)  # [tokens, experts]
    np.put_along_axis(routed, expert_index, True, axis=1)
    taken = np.zeros(expert_index.shape[0], bool)
    for expert in np.argsort(routed.sum(axis=0), kind="stable"):
        missing = per_expert - int(np.sum(routed[:, expert] & taken))
        if missing > 0:
            candidates = np.flatnonzero(routed[:, expert] & ~taken)
            taken[candidates[:missing]] = True
    return np.flatnonzero(taken)
