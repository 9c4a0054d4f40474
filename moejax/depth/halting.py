"""Relative-norm halting: per token, skip a MoE update whose norm is small next to the residual.

Equifinality in Mixture of Experts. `relative_norm_halting` is the oracle form (measures what a
threshold costs); `halting_mask_from_previous` and `apply_halting` are the deployable form that
decides before the experts run; `moe_flops_saved_fraction` totals the saving over layers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _check_halting_threshold(threshold: float) -> None:
    if not (math.isfinite(threshold) and threshold >= 0.0):
        raise ValueError(f"threshold: got {threshold!r}; allowed: a finite value >= 0")


def relative_norm(x: jax.Array, update: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Per token `||update|| / ||x||` over the last axis, in float32.

    Args:
      x, update: [..., d_model].
      eps: floor on `||x||` so an all-zero token does not divide by zero.

    Returns:
      [...] float32.
    """
    norm_update = jnp.linalg.norm(update.astype(jnp.float32), axis=-1)
    norm_x = jnp.linalg.norm(x.astype(jnp.float32), axis=-1)
    return norm_update / jnp.maximum(norm_x, eps)


def apply_halting(
    x: jax.Array, update: jax.Array, halted: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`y = x` for halted tokens, `x + update` for the rest.

    Args:
      x, update: [..., d_model].
      halted: [...] bool.

    Returns:
      y in x's dtype, and aux: `halted_fraction` scalar float32 (the share of this layer's
      expert FLOPs that halting can save) and `relative_norm [...]` float32 of the update that
      was applied (0 for halted tokens), which feeds the next `halting_mask_from_previous`.
    """
    y = jnp.where(halted[..., None], x, x + update.astype(x.dtype))
    rel = jnp.where(halted, 0.0, relative_norm(x, update))
    aux = {"halted_fraction": jnp.mean(halted.astype(jnp.float32)), "relative_norm": rel}
    return y, aux


def relative_norm_halting(
    x: jax.Array, update: jax.Array, *, threshold: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Skip a MoE layer's update for tokens where it is small next to the residual stream.

    Equifinality in Mixture of Experts: Routing Topology Does Not Determine Language Modeling
    Quality (zero-shot relative-norm halting: 25% of MoE FLOPs saved at +0.12% PPL). Per token
    `rho = ||update|| / ||x||`; `y = x` where `rho < threshold`, else `x + update`. Zero-shot:
    no training, only a threshold.

    This oracle form needs the update to decide, so the experts have already run and it saves
    no compute: use it to measure how much quality a threshold costs and what share of tokens
    it halts. The deployable form decides before the experts run, from a norm already known:
    `halting_mask_from_previous` on the previous MoE application's relative norm (previous
    layer, or previous hop of a multi-hop MoE; PAPERS.md gives only the headline, not which),
    then `apply_halting` with the halted tokens left out of dispatch.

    Args:
      x: [..., d_model] the MoE layer's input residual stream.
      update: [..., d_model] the MoE layer's output (what it adds to x).
      threshold: halt where the relative norm is below this, >= 0.

    Returns:
      y in x's dtype, and aux: `halted_fraction` and `mean_relative_norm` scalar float32, and
      `relative_norm [...]` float32 of every token's update (halted or not).
    """
    _check_halting_threshold(threshold)
    rel = relative_norm(x, update)
    y, aux = apply_halting(x, update, rel < threshold)
    aux["relative_norm"] = rel
    aux["mean_relative_norm"] = jnp.mean(rel)
    return y, aux


def halting_mask_from_previous(
    prev_relative_norm: jax.Array,
    threshold: float,
    *,
    previously_halted: jax.Array | None = None,
) -> jax.Array:
    """Decide halting before the experts run, from the previous MoE update's relative norm.

    Equifinality in Mixture of Experts: Routing Topology Does Not Determine Language Modeling
    Quality. A token halts when the previous update was small (`rho < threshold`), or when it
    had already halted (`previously_halted`): a halted token has no new update to measure, so
    its decision carries forward.

    Args:
      prev_relative_norm: [...] float, e.g. `aux["relative_norm"]` of the previous layer.
      threshold: >= 0.
      previously_halted: optional [...] bool.

    Returns:
      [...] bool, True where this layer's experts can be skipped.
    """
    _check_halting_threshold(threshold)
    halted = prev_relative_norm < threshold
    if previously_halted is not None:
        halted = halted | previously_halted
    return halted


def moe_flops_saved_fraction(
    halted_fractions: jax.Array, flops_per_layer: jax.Array | None = None
) -> jax.Array:
    """Share of all MoE FLOPs saved across layers: `sum(h_l * F_l) / sum(F_l)`.

    Args:
      halted_fractions: [layers] share of tokens halted in each MoE layer.
      flops_per_layer: optional [layers] expert FLOPs per layer when every token runs; equal
        layers (a plain mean) when omitted.

    Returns:
      scalar float32.
    """
    halted = jnp.asarray(halted_fractions, jnp.float32)
    if flops_per_layer is None:
        return jnp.mean(halted)
    flops = jnp.asarray(flops_per_layer, jnp.float32)
    if flops.shape != halted.shape:
        raise ValueError(
            f"flops_per_layer: got shape {flops.shape}; allowed: {halted.shape} "
            "(one entry per layer, like halted_fractions)"
        )
    return jnp.sum(halted * flops) / jnp.sum(flops)
