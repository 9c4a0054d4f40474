"""Per-group integer fake quantisation of a kernel `w [..., d_in, d_out]` (`y = x @ w`).

Each output column's inputs are cut into groups of `group_size` consecutive inputs, and every
group gets its own scale (and, asymmetric, its own zero point): the layout of GPTQ's and AWQ's
"g128" checkpoints. Leading axes are batch axes, so the stacked expert weights of a MoE layer
(`w_gate [experts, d_model, d_ff]`) quantise in one call, every expert with its own scales.

- Symmetric: `scale = max|w| / (2^(b-1) - 1)` per group, `codes = round(w / scale)` in
  `[-(2^(b-1) - 1), 2^(b-1) - 1]`, so the group's largest |w| maps to ±(2^(b-1) - 1) exactly.
- Asymmetric: `scale = (max w - min w) / (2^b - 1)` and an integer zero point put the group's
  min on the lowest code `-2^(b-1)` and its max on the highest `2^(b-1) - 1`; `w_hat = (codes -
  zeros) * scale`. The zero point is not clipped to the code range (AWQ clips it, which makes
  a group of only positive weights lose its low end), so it is kept as an integer-valued float.

Codes are int8 for every width from 2 to 8 bits (packing two int4 codes per byte is a storage
matter for a kernel, not for the math). Rounding is to nearest (ties to even), so every weight
is within half a step of its dequantised value. `fake_quant` is `dequantize(quantize(w))` with
a straight-through gradient (Bengio et al., "Estimating or Propagating Gradients Through
Stochastic Neurons for Conditional Computation", 2013): the identity, so quantisation-aware
fine-tuning trains the float weights.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from moejax.errors import require

MIN_BITS, MAX_BITS = 2, 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A per-group quantised kernel: `codes` int8 `[..., d_in, d_out]`, `scales [..., d_in /
    group_size, d_out]` (float32, or float64 for a float64 weight), `zeros` of the scales'
    shape (integer-valued) for asymmetric quantisation or None for symmetric. `w_hat = (codes
    - zeros) * scales`, each scale repeated over its group's `group_size` inputs."""

    codes: jax.Array
    scales: jax.Array
    zeros: jax.Array | None
    bits: int = dataclasses.field(metadata={"static": True})
    group_size: int = dataclasses.field(metadata={"static": True})


def check_quantization(w: jax.Array, bits: int, group_size: int) -> None:
    """ValueError naming the field unless `w [..., d_in, d_out]` can be quantised with `bits`
    in 2..8 and groups of `group_size` inputs (a divisor of d_in)."""
    shape = getattr(w, "shape", None)
    require(getattr(w, "ndim", 0) >= 2, "w.shape", shape, "[..., d_in, d_out]")
    require(
        isinstance(bits, int) and MIN_BITS <= bits <= MAX_BITS,
        "bits",
        bits,
        f"an int in {MIN_BITS}..{MAX_BITS}",
    )
    require(
        isinstance(group_size, int) and group_size >= 1 and shape[-2] % group_size == 0,
        "group_size",
        group_size,
        f"a positive divisor of d_in={shape[-2]}",
    )


def _compute_dtype(w: jax.Array) -> jnp.dtype:
    # float32 at least (bfloat16 weights quantise in float32); float64 stays float64.
    return jnp.promote_types(w.dtype, jnp.float32)


def _groups(w: jax.Array, group_size: int) -> jax.Array:
    """`[..., d_in, d_out]` -> `[..., d_in / group_size, group_size, d_out]`."""
    *lead, d_in, d_out = w.shape
    return w.reshape(*lead, d_in // group_size, group_size, d_out)


def _expand(per_group: jax.Array, group_size: int) -> jax.Array:
    """`[..., groups, d_out]` -> `[..., groups * group_size, d_out]`: each row repeated."""
    return jnp.repeat(per_group, group_size, axis=-2)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(w: jax.Array, bits: int, group_size: int, symmetric: bool) -> QuantizedWeight:
    w = w.astype(_compute_dtype(w))
    grouped = _groups(w, group_size)  # [..., groups, group_size, d_out]
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if symmetric:
        absmax = jnp.max(jnp.abs(grouped), axis=-2)  # [..., groups, d_out]
        # An all-zero group has any scale; 1 keeps the division finite.
        scales = jnp.where(absmax > 0, absmax / high, 1.0)
        codes = jnp.clip(jnp.round(w / _expand(scales, group_size)), -high, high)
        return QuantizedWeight(codes.astype(jnp.int8), scales, None, bits, group_size)
    lo, hi = jnp.min(grouped, axis=-2), jnp.max(grouped, axis=-2)  # [..., groups, d_out]
    # A constant group c: scale |c| and a zero point one step from the lowest code give
    # w_hat = c exactly (scale 1 for an all-zero group).
    constant = jnp.where(lo != 0, jnp.abs(lo), 1.0)
    scales = jnp.where(hi > lo, (hi - lo) / (high - low), constant)
    zeros = low - jnp.round(lo / scales)
    codes = jnp.round(w / _expand(scales, group_size)) + _expand(zeros, group_size)
    codes = jnp.clip(codes, low, high)
    return QuantizedWeight(codes.astype(jnp.int8), scales, zeros, bits, group_size)


def quantize(w: jax.Array, bits: int, group_size: int, symmetric: bool = True) -> QuantizedWeight:
    """Per-group integer quantisation of `w [..., d_in, d_out]` (see the module docstring):
    codes int8 `[..., d_in, d_out]`, scales `[..., d_in / group_size, d_out]`, zeros (the
    scales' shape) when not `symmetric`. `group_size = d_in` gives one scale per column."""
    check_quantization(w, bits, group_size)
    return _quantize(w, bits, group_size, bool(symmetric))


@jax.jit
def dequantize(q: QuantizedWeight) -> jax.Array:
    """`w_hat [..., d_in, d_out] = (codes - zeros) * scales` in the scales' dtype."""
    codes = q.codes.astype(q.scales.dtype)
    if q.zeros is not None:
        codes = codes - _expand(q.zeros, q.group_size)
    return codes * _expand(q.scales, q.group_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _fake_quant(w: jax.Array, bits: int, group_size: int, symmetric: bool) -> jax.Array:
    return dequantize(_quantize(w, bits, group_size, symmetric)).astype(w.dtype)


def _fake_quant_forward(w, bits, group_size, symmetric):
    return _fake_quant(w, bits, group_size, symmetric), None


def _fake_quant_backward(bits, group_size, symmetric, residuals, cotangent):
    del bits, group_size, symmetric, residuals
    return (cotangent,)  # straight through


_fake_quant.defvjp(_fake_quant_forward, _fake_quant_backward)


def fake_quant(w: jax.Array, bits: int, group_size: int, symmetric: bool = True) -> jax.Array:
    """`dequantize(quantize(w, bits, group_size, symmetric))` in `w`'s dtype, `[..., d_in,
    d_out]`, whose gradient is the identity (straight-through estimator): the forward pass sees
    the quantised weight and the float weight trains."""
    check_quantization(w, bits, group_size)
    return _fake_quant(w, bits, group_size, bool(symmetric))


def fake_quant_activations(x: jax.Array, bits: int, symmetric: bool = True) -> jax.Array:
    """Per-token fake quantisation of activations `x [..., d]` (one scale per token over its
    `d` features, the "A" of W4A4) in `x`'s dtype, with the straight-through gradient."""
    require(getattr(x, "ndim", 0) >= 1, "x.shape", getattr(x, "shape", None), "[..., d]")
    return fake_quant(x[..., None], bits, x.shape[-1], symmetric)[..., 0]
