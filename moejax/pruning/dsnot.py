"""Training-free refinement of a sparse layer's mask by prune-and-grow swaps.

*Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs* (DSnoT). For output r
of a linear layer with dense weights W and mask M, the expected reconstruction error over the
calibration inputs is

    ε_r = E[W_r · x − (M_r ⊙ W_r) · x] = Σ_j (1 − M_rj) W_rj E[x_j].

Each cycle, every output whose |ε_r| is above the tolerance makes one swap:
- grow the pruned weight i whose revival moves ε_r towards 0 (sign(W_ri E[x_i]) = sign(ε_r))
  with the largest |W_ri E[x_i]|, divided by Var(x_i) so that noisy features are avoided;
- prune the kept weight j whose removal moves the new error back towards 0
  (sign(W_rj E[x_j]) = −sign(ε_r')) with the smallest Wanda score |W_rj| ‖x_j‖.
A swap that would not lower |ε_r| is not made, so the criterion never gets worse, and every swap
keeps the number of weights per output. No gradients; each cycle is linear in the weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class DsnotResult:
    """mask: bool [d_in, d_out]; error_before / error_after: [d_out], |ε_r| of the starting and
    final masks; swaps: [d_out] swaps made per output."""

    mask: jax.Array
    error_before: jax.Array
    error_after: jax.Array
    swaps: jax.Array


def expected_error(w: jax.Array, mask: jax.Array, mean_x: jax.Array) -> jax.Array:
    """ε per output: w, mask [d_in, d_out], mean_x [d_in] -> [d_out] (dense minus sparse)."""
    pruned = jnp.where(mask, 0.0, w.astype(jnp.float32))
    return mean_x @ pruned


def dsnot(
    w: jax.Array,
    mask: jax.Array,
    x: jax.Array,
    *,
    max_cycles: int = 50,
    tolerance: float = 0.0,
    use_variance: bool = True,
) -> DsnotResult:
    """Refines `mask` for a layer `y = x @ (mask ⊙ w)` without training.

    w: [d_in, d_out] (Flax kernel layout); mask: bool [d_in, d_out], e.g. from magnitude or
    Wanda; x: [tokens, d_in] calibration inputs. Each output column keeps its number of kept
    weights. Runs `max_cycles` swap cycles; outputs with |ε_r| <= tolerance stop.
    """
    if w.ndim != 2 or mask.shape != w.shape or x.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(
            "expected w: [d_in, d_out], mask: the same shape, x: [tokens, d_in]; got "
            f"{w.shape}, {mask.shape}, {x.shape}."
        )
    if max_cycles < 0:
        raise ValueError(f"max_cycles must be >= 0, got {max_cycles}.")
    w32 = w.astype(jnp.float32)
    x32 = x.astype(jnp.float32)
    mean_x = jnp.mean(x32, axis=0)  # [d_in]
    var_x = jnp.var(x32, axis=0) if use_variance else jnp.ones_like(mean_x)  # [d_in]
    contribution = w32 * mean_x[:, None]  # [d_in, d_out]: W_rj E[x_j]
    wanda = jnp.abs(w32) * jnp.linalg.norm(x32, axis=0)[:, None]  # [d_in, d_out]
    grow_gain = jnp.abs(contribution) / (var_x[:, None] + 1e-12)  # [d_in, d_out]
    columns = jnp.arange(w.shape[1])
    mask = mask.astype(bool)
    error0 = expected_error(w32, mask, mean_x)  # [d_out]

    def cycle(_, carry):
        mask, error, swaps = carry
        sign = jnp.sign(error)  # [d_out]
        can_grow = ~mask & (jnp.sign(contribution) == sign[None, :])
        grow = jnp.argmax(jnp.where(can_grow, grow_gain, -jnp.inf), axis=0)  # [d_out]
        error_grown = error - contribution[grow, columns]
        can_prune = mask & (jnp.sign(contribution) == -jnp.sign(error_grown)[None, :])
        prune = jnp.argmin(jnp.where(can_prune, wanda, jnp.inf), axis=0)  # [d_out]
        error_new = error_grown + contribution[prune, columns]
        accept = (
            jnp.any(can_grow, axis=0)
            & jnp.any(can_prune, axis=0)
            & (jnp.abs(error) > tolerance)
            & (jnp.abs(error_new) < jnp.abs(error))
        )  # [d_out]
        grown = mask.at[grow, columns].set(mask[grow, columns] | accept)
        swapped = grown.at[prune, columns].set(grown[prune, columns] & ~accept)
        return swapped, jnp.where(accept, error_new, error), swaps + accept

    mask, _, swaps = jax.lax.fori_loop(
        0, max_cycles, cycle, (mask, error0, jnp.zeros(w.shape[1], jnp.int32))
    )
    # Recomputed rather than carried so that float drift over many swaps is not reported.
    error = expected_error(w32, mask, mean_x)
    return DsnotResult(mask, jnp.abs(error0), jnp.abs(error), swaps)
