"""Group sparsity with group quantisation of what is left (GQSA: Zeng et al., "GQSA: Group
Quantization and Sparsity for Accelerating Large Language Model Inference", 2024).

A kernel `w [..., d_in, d_out]` is cut into the same groups that per-group quantisation uses:
`group_size` consecutive inputs of one output column. Whole groups are removed, so a kernel
skips them as a unit (a structured sparsity finer than channels and coarser than 2:4), and the
kept groups are quantised with their own scales (`moejax.quantization.fake_quant`); the removed
groups' weights never enter a kept group's scale. Each output column keeps the same number of
groups, so the work per output is balanced.

A group's score is its weights' L2 norm, or with calibration statistics the Wanda-style
`sqrt(Σ_i w_i² ||x_i||²)` over its inputs (`sq_norms [..., d_in] = Σ_t x_ti²`, as
`moejax.pruning.one_shot.LayerStatistics` holds): how much the layer's output loses without it.
The kept groups are rounded to nearest; the paper's reconstruction training is a driver's job.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.errors import require
from moejax.quantization.fake_quant import (
    _expand,
    _groups,
    check_quantization,
    dequantize,
    quantize,
)


def group_scores(w: jax.Array, sq_norms: jax.Array | None, group_size: int) -> jax.Array:
    """`[..., d_in / group_size, d_out]` float32: each group's `||w_group||` or, with
    `sq_norms [..., d_in]`, `sqrt(Σ_i w_i² sq_norms_i)` over the group's inputs."""
    energy = jnp.square(w.astype(jnp.float32))  # [..., d_in, d_out]
    if sq_norms is not None:
        energy = energy * sq_norms.astype(jnp.float32)[..., :, None]
    return jnp.sqrt(jnp.sum(_groups(energy, group_size), axis=-2))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _gqsa(w, sq_norms, sparsity, bits, group_size, symmetric):
    scores = group_scores(w, sq_norms, group_size)  # [..., groups, d_out]
    groups = scores.shape[-2]
    keep = groups - round(sparsity * groups)
    order = jnp.argsort(-scores, axis=-2, stable=True)  # [..., groups, d_out]
    ranks = jnp.argsort(order, axis=-2, stable=True)  # 0 = the column's best group
    group_mask = ranks < keep
    w_hat = dequantize(quantize(w, bits, group_size, symmetric))
    kept = _expand(group_mask, group_size)  # [..., d_in, d_out]
    return jnp.where(kept, w_hat, 0).astype(w.dtype), group_mask


def gqsa(
    w: jax.Array,
    sq_norms: jax.Array | None,
    sparsity: float,
    bits: int,
    group_size: int,
    *,
    symmetric: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """GQSA of `w [..., d_in, d_out]`: `(w_hat [..., d_in, d_out] in w's dtype, group_mask bool
    [..., d_in / group_size, d_out])`. Every output column removes `round(sparsity * groups)`
    of its `d_in / group_size` groups, the lowest by `group_scores` (with `sq_norms [...,
    d_in]`, or None for the weight norm), zeroes them, and quantises each kept group to `bits`
    with its own scale. `group_mask` is True where a group is kept."""
    check_quantization(w, bits, group_size)
    require(
        isinstance(sparsity, int | float) and 0.0 <= sparsity < 1.0,
        "sparsity",
        sparsity,
        "a share of groups in [0, 1)",
    )
    if sq_norms is not None:
        shape = getattr(sq_norms, "shape", None)
        require(shape == w.shape[:-1], "sq_norms.shape", shape, f"w.shape[:-1] = {w.shape[:-1]}")
    return _gqsa(w, sq_norms, float(sparsity), bits, group_size, bool(symmetric))
