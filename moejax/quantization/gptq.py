"""Per-group quantisation with error feedback (GPTQ: Frantar et al., "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", 2023) of a kernel `w
[d_in, d_out]` (`y = x @ w`), given the layer Hessian `H = Σ x xᵀ` of its calibration inputs
(`moejax.pruning.one_shot.LayerStatistics.hessian`).

Inputs are rounded in order; after each, the rounding error of every output is spread over the
inputs not yet rounded along row i of the upper Cholesky factor of `H⁻¹`, which minimises the
growth of `||x (w - w_hat)||²` (the output error on the calibration tokens). The group scales
(and zero points) are those of the weight before any update ("static groups"), so the codes
share `moejax.quantization.fake_quant`'s layout and `dequantize`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.errors import require
from moejax.quantization.fake_quant import (
    QuantizedWeight,
    _expand,
    _quantize,
    check_quantization,
)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _gptq(w, hessian, bits, group_size, symmetric, damp):
    dtype = jnp.promote_types(jnp.promote_types(w.dtype, hessian.dtype), jnp.float32)
    w, hessian = w.astype(dtype), hessian.astype(dtype)
    d_in = w.shape[0]
    static = _quantize(w, bits, group_size, symmetric)
    scales = _expand(static.scales, group_size)  # [d_in, d_out]
    zeros = jnp.zeros_like(scales) if static.zeros is None else _expand(static.zeros, group_size)
    low = -(2 ** (bits - 1)) if not symmetric else -(2 ** (bits - 1) - 1)
    high = 2 ** (bits - 1) - 1
    # Inputs that never fire carry no error; a unit diagonal keeps the inverse finite.
    dead = jnp.diag(hessian) == 0
    hessian = hessian + jnp.diag(dead.astype(dtype))
    hessian = hessian + damp * jnp.mean(jnp.diag(hessian)) * jnp.eye(d_in, dtype=dtype)
    inverse = jnp.linalg.inv(hessian)
    hinv = jnp.linalg.cholesky((inverse + inverse.T) / 2).T  # upper: row i reaches inputs >= i

    def step(i, carry):
        w, codes = carry
        row = w[i]  # [d_out]
        code = jnp.clip(jnp.round(row / scales[i]) + zeros[i], low, high)
        error = (row - (code - zeros[i]) * scales[i]) / hinv[i, i]  # [d_out]
        return w - jnp.outer(hinv[i], error), codes.at[i].set(code)

    _, codes = jax.lax.fori_loop(0, d_in, step, (w, jnp.zeros_like(w)))
    return QuantizedWeight(codes.astype(jnp.int8), static.scales, static.zeros, bits, group_size)


def gptq_quantize(
    w: jax.Array,
    hessian: jax.Array,
    bits: int,
    group_size: int,
    *,
    symmetric: bool = True,
    damp: float = 0.01,
) -> QuantizedWeight:
    """GPTQ (see the module docstring) of `w [d_in, d_out]` with `hessian [d_in, d_in] = Σ x
    xᵀ`: a `QuantizedWeight` with `quantize(w, bits, group_size, symmetric)`'s scales and
    zeros and codes chosen with error feedback. `damp` adds `damp * mean(diag H)` to the
    diagonal."""
    check_quantization(w, bits, group_size)
    require(w.ndim == 2, "w.shape", w.shape, "[d_in, d_out]")
    shape = getattr(hessian, "shape", None)
    d_in = w.shape[0]
    require(shape == (d_in, d_in), "hessian.shape", shape, f"[{d_in}, {d_in}]")
    require(damp > 0, "damp", damp, "> 0")
    return _gptq(w, hessian, bits, group_size, bool(symmetric), float(damp))
