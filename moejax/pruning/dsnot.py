"""The method "dsnot": training-free refinement of a sparse layer's mask by prune-and-grow swaps.

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
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax.errors import require
from moejax.pruning.base import MethodSpec, PruningOptions, register
from moejax.pruning.masks import path_name


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
    group_size: int | None = None,
) -> DsnotResult:
    """Refines `mask` for a layer `y = x @ (mask ⊙ w)` without training.

    w: [d_in, d_out] (Flax kernel layout); mask: bool [d_in, d_out], e.g. from magnitude or
    Wanda; x: [tokens, d_in] calibration inputs. Each output column keeps its number of kept
    weights. Runs `max_cycles` swap cycles; outputs with |ε_r| <= tolerance stop. With
    `group_size=m` a swap stays inside one group of m consecutive inputs, so an N:M mask stays
    N:M. DSnoT reads `x` only through its per-input mean, variance and norm
    (`dsnot_from_moments`).
    """
    require(
        w.ndim == 2 and mask.shape == w.shape and x.ndim == 2 and x.shape[1] == w.shape[0],
        "w, mask, x shapes",
        (w.shape, mask.shape, x.shape),
        "w: [d_in, d_out], mask: the same shape, x: [tokens, d_in]",
    )
    x32 = x.astype(jnp.float32)
    return dsnot_from_moments(
        w,
        mask,
        jnp.mean(x32, axis=0),
        jnp.var(x32, axis=0),
        jnp.linalg.norm(x32, axis=0),
        max_cycles=max_cycles,
        tolerance=tolerance,
        use_variance=use_variance,
        group_size=group_size,
    )


def dsnot_from_moments(
    w: jax.Array,
    mask: jax.Array,
    mean_x: jax.Array,
    var_x: jax.Array,
    norm_x: jax.Array,
    *,
    max_cycles: int = 50,
    tolerance: float = 0.0,
    use_variance: bool = True,
    group_size: int | None = None,
) -> DsnotResult:
    """`dsnot` from the calibration inputs' per-input mean, variance and norm (all [d_in]),
    as running statistics give them without keeping the tokens (`one_shot.LayerStatistics`)."""
    d_in, d_out = w.shape
    require(
        mask.shape == w.shape and mean_x.shape == var_x.shape == norm_x.shape == (d_in,),
        "w, mask, moment shapes",
        (w.shape, mask.shape, mean_x.shape, var_x.shape, norm_x.shape),
        "w: [d_in, d_out], mask: the same shape, mean/variance/norm: [d_in]",
    )
    require(max_cycles >= 0, "max_cycles", max_cycles, ">= 0")
    require(
        group_size is None or (group_size > 0 and d_in % group_size == 0),
        "group_size",
        group_size,
        f"None or an int dividing d_in={d_in}",
    )
    w32 = w.astype(jnp.float32)
    mean_x = mean_x.astype(jnp.float32)
    var_x = var_x.astype(jnp.float32) if use_variance else jnp.ones_like(mean_x)
    contribution = w32 * mean_x[:, None]  # [d_in, d_out]: W_rj E[x_j]
    wanda = jnp.abs(w32) * norm_x.astype(jnp.float32)[:, None]  # [d_in, d_out]
    grow_gain = jnp.abs(contribution) / (var_x[:, None] + 1e-12)  # [d_in, d_out]
    mask = mask.astype(bool)
    error0 = expected_error(w32, mask, mean_x)  # [d_out]
    cycle = _column_cycle if group_size is None else _group_cycle
    scores = (contribution, wanda, grow_gain, tolerance, group_size)

    def body(_, carry):
        mask, error, swaps = carry
        mask, error, accept = cycle(mask, error, *scores)
        return mask, error, swaps + accept

    mask, _, swaps = jax.lax.fori_loop(
        0, max_cycles, body, (mask, error0, jnp.zeros(d_out, jnp.int32))
    )
    # Recomputed rather than carried so that float drift over many swaps is not reported.
    error = expected_error(w32, mask, mean_x)
    return DsnotResult(mask, jnp.abs(error0), jnp.abs(error), swaps)


def _column_cycle(mask, error, contribution, wanda, grow_gain, tolerance, _):
    """One swap per output anywhere in its column: grow the best-gain pruned weight that
    moves ε towards 0, then prune the lowest-Wanda kept weight that moves it back."""
    columns = jnp.arange(mask.shape[1])
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
    return swapped, jnp.where(accept, error_new, error), accept


def _group_cycle(mask, error, contribution, wanda, grow_gain, tolerance, group_size):
    """One swap per output inside one group of `group_size` inputs (N:M stays N:M): among the
    pruned weights that move ε towards 0 and have, in their own group, a kept weight whose
    removal leaves |ε| lower than before, grow the best-gain one and prune that group's
    lowest-Wanda such partner."""
    d_in, d_out = mask.shape
    groups, m = d_in // group_size, group_size
    grouped = [a.reshape(groups, m, d_out) for a in (mask, contribution, wanda, grow_gain)]
    kept, contrib, wanda_g, gain = grouped
    sign = jnp.sign(error)  # [d_out]
    can_grow = ~kept & (jnp.sign(contrib) == sign)  # [groups, m, d_out]
    # Pair (grow p, prune q) of one group: ε' = ε - c_p + c_q.  [groups, m_p, m_q, d_out]
    error_grown = error - contrib  # [groups, m, d_out]
    error_new = error_grown[:, :, None, :] + contrib[:, None, :, :]
    can_prune = (
        kept[:, None, :, :]
        & (jnp.sign(contrib)[:, None, :, :] == -jnp.sign(error_grown)[:, :, None, :])
        & (jnp.abs(error_new) < jnp.abs(error))
    )
    partner = jnp.argmin(jnp.where(can_prune, wanda_g[:, None, :, :], jnp.inf), axis=2)
    has_partner = jnp.any(can_prune, axis=2)  # [groups, m, d_out]
    flat_gain = jnp.where(can_grow & has_partner, gain, -jnp.inf).reshape(d_in, d_out)
    grow = jnp.argmax(flat_gain, axis=0)  # [d_out]: an input index
    columns = jnp.arange(d_out)
    accept = jnp.isfinite(flat_gain[grow, columns]) & (jnp.abs(error) > tolerance)
    prune = (grow // m) * m + partner.reshape(d_in, d_out)[grow, columns]  # [d_out]
    error_after = error - contribution[grow, columns] + contribution[prune, columns]
    grown = mask.at[grow, columns].set(mask[grow, columns] | accept)
    swapped = grown.at[prune, columns].set(grown[prune, columns] & ~accept)
    return swapped, jnp.where(accept, error_after, error), accept


# --- mixture-of-experts layers ----------------------------------------------------------


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


# --- the registered method ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DsnotOptions(PruningOptions):
    """Options of "dsnot": at most `max_cycles` swap cycles per matrix; outputs with
    |ε_r| <= `tolerance` stop; `use_variance` divides the grow gain by Var(x_i)."""

    max_cycles: int = 50
    tolerance: float = 0.0
    use_variance: bool = True

    def __post_init__(self) -> None:
        require(self.max_cycles >= 0, "max_cycles", self.max_cycles, ">= 0")
        require(self.tolerance >= 0, "tolerance", self.tolerance, ">= 0")


def dsnot_refine(
    params: Any, masks: Any, *, prunable: Any, options: DsnotOptions, calibration: dict
) -> Any:
    """DSnoT on every prunable 2-D leaf [d_in, d_out] that `calibration` holds inputs
    [tokens, d_in] for (by path name); other leaves keep their masks."""
    flags = iter(jax.tree.leaves(prunable))

    def refine(path, w, mask):
        name = path_name(path)
        if not next(flags) or name not in calibration:
            return mask
        result = dsnot(
            w,
            mask,
            calibration[name],
            max_cycles=options.max_cycles,
            tolerance=options.tolerance,
            use_variance=options.use_variance,
        )
        return result.mask

    return jax.tree_util.tree_map_with_path(refine, params, masks)


DSNOT = register(MethodSpec("dsnot", DsnotOptions, refine=dsnot_refine, needs=("calibration",)))
