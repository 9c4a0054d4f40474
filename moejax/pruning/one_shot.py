"""One-shot pruning of a trained linear layer from calibration inputs: magnitude, Wanda and
SparseGPT, unstructured or N:M, on moejax's kernel layout `w [d_in, d_out]` (`y = x @ w`).

- Magnitude keeps the largest |w|.
- Wanda (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models", 2023)
  scores `|w_ij| * ||x_i||` (the input's norm over the calibration tokens) and compares the
  scores of each output (column) only: each output keeps the same share of its inputs.
- SparseGPT (Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned
  in One-Shot", 2023) prunes inputs in order and, after each, updates the not-yet-visited
  weights of every output to compensate (optimal brain surgeon with the layer Hessian
  `H = Σ x xᵀ`): the error `(w - q) / [H⁻¹]_ii` of input i is spread along row i of the upper
  Cholesky factor of `H⁻¹`. The mask of each block of `block_size` inputs is chosen when the
  block is reached (by `w² / [H⁻¹]_ii²`), so it sees the updates of the blocks before it; the
  updates inside a block are applied at once to the inputs after it (lazy batching). N:M masks
  are chosen per group of m inputs as the group is reached.

The statistics accumulate over calibration batches (`LayerStatistics`), so no batch of
activations is kept: `d_in² + 2 d_in` numbers per layer. `sparsegpt(..., mask=)` rebuilds the
weights for a mask chosen elsewhere with the same compensating updates: a refinement
(`ONE_SHOT_REFINEMENTS`: DSnoT's training-free swaps) changes any method's mask, and the
method's `rebuild` then gives the weights for it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moejax.errors import require
from moejax.pruning.dsnot import dsnot_from_moments
from moejax.pruning.patterns import nm_mask, unstructured_mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStatistics:
    """Running sums over the calibration tokens of a linear layer's inputs: `hessian [d_in,
    d_in] = Σ x xᵀ`, `sq_norms [d_in] = Σ x²`, `sums [d_in] = Σ x` (float32), `tokens` (scalar
    float32)."""

    hessian: jax.Array
    sq_norms: jax.Array
    sums: jax.Array
    tokens: jax.Array

    @staticmethod
    def zeros(d_in: int) -> LayerStatistics:
        zeros = jnp.zeros(d_in, jnp.float32)
        return LayerStatistics(jnp.zeros((d_in, d_in), jnp.float32), zeros, zeros, jnp.float32(0))

    def mean_and_variance(self) -> tuple[jax.Array, jax.Array]:
        """Per input over the counted tokens: (mean [d_in], population variance [d_in])."""
        tokens = jnp.maximum(self.tokens, 1.0)
        mean = self.sums / tokens
        return mean, jnp.maximum(self.sq_norms / tokens - mean**2, 0.0)


@jax.jit
def accumulate(
    stats: LayerStatistics, x: jax.Array, token_weights: jax.Array | None = None
) -> LayerStatistics:
    """`stats` with the inputs `x [tokens, d_in]` added; `token_weights [tokens]` (0 or 1)
    counts only some tokens (an expert's statistics count the tokens routed to it)."""
    x = x.astype(jnp.float32)
    if token_weights is not None:
        x = x * token_weights.astype(jnp.float32)[:, None]
        count = jnp.sum(token_weights.astype(jnp.float32))
    else:
        count = jnp.float32(x.shape[0])
    hessian = jnp.einsum("ti,tj->ij", x, x, precision=jax.lax.Precision.HIGHEST)
    return LayerStatistics(
        stats.hessian + hessian,
        stats.sq_norms + jnp.sum(x * x, axis=0),
        stats.sums + jnp.sum(x, axis=0),
        stats.tokens + count,
    )


def _check(w: jax.Array, sparsity: float, nm: tuple[int, int] | None) -> None:
    require(getattr(w, "ndim", None) == 2, "w.shape", getattr(w, "shape", None), "[d_in, d_out]")
    require(0.0 <= sparsity < 1.0, "sparsity", sparsity, "a share in [0, 1)")
    if nm is not None:
        n, m = nm
        require(
            0 < n <= m and w.shape[0] % m == 0, "nm", nm, f"n:m with m dividing d_in={w.shape[0]}"
        )


def magnitude_mask(w: jax.Array, sparsity: float, nm: tuple[int, int] | None = None) -> jax.Array:
    """bool `[d_in, d_out]`, True where `w` is kept: the largest |w| of the whole layer, or the
    n largest of every m consecutive inputs of each output with `nm=(n, m)`."""
    _check(w, sparsity, nm)
    scores = jnp.abs(w.astype(jnp.float32))
    return nm_mask(scores, *nm, 0) if nm else unstructured_mask(scores, sparsity)


def wanda_mask(
    w: jax.Array, sq_norms: jax.Array, sparsity: float, nm: tuple[int, int] | None = None
) -> jax.Array:
    """bool `[d_in, d_out]`, True where kept: the highest `|w_ij| * ||x_i||` of each output
    (`sq_norms [d_in] = Σ x_i²`), or of every m consecutive inputs of each output with `nm`."""
    _check(w, sparsity, nm)
    scores = jnp.abs(w.astype(jnp.float32)) * jnp.sqrt(sq_norms.astype(jnp.float32))[:, None]
    return nm_mask(scores, *nm, 0) if nm else unstructured_mask(scores, sparsity, per_slice_axis=1)


def sparsegpt(
    w: jax.Array,
    hessian: jax.Array,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """SparseGPT (see the module docstring): `(w_pruned [d_in, d_out] in w's dtype, kept mask
    bool [d_in, d_out])` from `w` and `hessian [d_in, d_in] = Σ x xᵀ`. Each block prunes
    exactly `int(sparsity * size)` weights (the reference code's `<=` threshold prunes one
    more).

    `damp` adds `damp * mean(diag H)` to the diagonal (H is often singular); inputs that never
    fire (`H_ii = 0`) are pruned outright. Unstructured: each block of `block_size` inputs
    prunes `sparsity` of its weights (all outputs together), as the reference does; with
    `nm=(n, m)` every m consecutive inputs of each output keep n and `block_size` must be a
    multiple of m.

    `mask` (bool `[d_in, d_out]`, True where kept) fixes which weights go instead of choosing
    them: the same sweep then only compensates for the given pruning (`sparsity` and `nm` are
    not used to choose).
    """
    _check(w, sparsity, nm)
    d_in = w.shape[0]
    require(hessian.shape == (d_in, d_in), "hessian.shape", hessian.shape, f"[{d_in}, {d_in}]")
    block_size = min(block_size, d_in)
    if nm is not None:
        require(block_size % nm[1] == 0, "block_size", block_size, f"a multiple of m={nm[1]}")
    # float32 at least; float64 when both inputs are (the tests' references).
    dtype = jnp.promote_types(jnp.promote_types(w.dtype, hessian.dtype), jnp.float32)
    if mask is not None:
        require(mask.shape == w.shape, "mask.shape", mask.shape, f"w's shape {w.shape}")
        mask = mask.astype(bool)
    pruned, kept = _sparsegpt(
        w.astype(dtype), hessian.astype(dtype), mask, sparsity, nm, block_size, damp
    )
    return pruned.astype(w.dtype), kept


@functools.partial(jax.jit, static_argnums=(3, 4, 5, 6))
def _sparsegpt(w, hessian, fixed, sparsity, nm, block_size, damp):
    weights = w.T  # [d_out, d_in]: inputs are columns, as in the paper
    d_in = weights.shape[1]
    dead = jnp.diag(hessian) == 0
    hessian = hessian + jnp.diag(dead.astype(hessian.dtype))
    weights = jnp.where(dead[None, :], 0.0, weights)
    hessian = hessian + damp * jnp.mean(jnp.diag(hessian)) * jnp.eye(d_in)
    # The upper Cholesky factor of H⁻¹: row i holds how pruning input i moves inputs j >= i.
    inverse = jnp.linalg.inv(hessian)
    hinv = jnp.linalg.cholesky((inverse + inverse.T) / 2).T
    masks = []
    for start in range(0, d_in, block_size):
        stop = min(start + block_size, d_in)
        block, block_hinv = weights[:, start:stop], hinv[start:stop, start:stop]
        fixed_pruned = None if fixed is None else ~fixed[start:stop, :].T
        block, errors, pruned = _prune_block(block, block_hinv, sparsity, nm, fixed_pruned)
        weights = weights.at[:, start:stop].set(block)
        # Lazy batching: the block's errors reach the later inputs in one matmul.
        later = errors @ hinv[start:stop, stop:]
        weights = weights.at[:, stop:].add(-later)
        masks.append(pruned)
    pruned = jnp.concatenate(masks, axis=1) | dead[None, :]
    return weights.T, ~pruned.T


def _prune_block(block, block_hinv, sparsity, nm, fixed_pruned):
    """One block `[d_out, b]`: (pruned block, errors [d_out, b], pruned bool [d_out, b]);
    `fixed_pruned [d_out, b]` (or None) is the pruning to compensate for, chosen elsewhere."""
    d_out, width = block.shape
    diag = jnp.diag(block_hinv)
    if fixed_pruned is not None:
        pruned, nm = fixed_pruned, None
    elif nm is None:
        scores = block**2 / diag[None, :] ** 2
        count = int(scores.size * sparsity)
        threshold = jnp.sort(scores.reshape(-1))[count - 1] if count else -jnp.inf
        pruned = scores <= threshold
    else:
        pruned = jnp.zeros((d_out, width), bool)
    n, m = nm if nm is not None else (0, 1)

    def column(i, carry):
        block, errors, pruned = carry
        if nm is not None:
            # The group of m inputs starting at i is chosen on the weights as updated so far.
            group = jax.lax.dynamic_slice(block, (0, i), (d_out, m))
            group_diag = jax.lax.dynamic_slice(diag, (i,), (m,))
            group_pruned = ~nm_mask(group**2 / group_diag[None, :] ** 2, n, m, 1)
            chosen = jax.lax.dynamic_update_slice(pruned, group_pruned, (0, i))
            pruned = jnp.where(i % m == 0, chosen, pruned)
        weight = block[:, i]
        kept = jnp.where(pruned[:, i], 0.0, weight)
        error = (weight - kept) / block_hinv[i, i]
        # Row i of the upper factor is zero before i: the update reaches inputs i.. only.
        block = block - error[:, None] * block_hinv[i][None, :]
        block = block.at[:, i].set(kept)
        errors = errors.at[:, i].set(error)
        return block, errors, pruned

    carry = (block, jnp.zeros_like(block), pruned)
    return jax.lax.fori_loop(0, width, column, carry)


@dataclasses.dataclass(frozen=True)
class OneShotMethod:
    """A one-shot method as the calibrated driver calls it. `prune(w [d_in, d_out], stats of
    its inputs, sparsity, nm) -> (pruned w, kept mask)`; `rebuild(w, stats, mask, nm) -> pruned
    w` gives the weights the method would keep for a mask chosen elsewhere (a refined one)."""

    prune: Callable[..., tuple[jax.Array, jax.Array]]
    rebuild: Callable[..., jax.Array]


def _zeroed(w: jax.Array, stats: LayerStatistics, mask: jax.Array, nm) -> jax.Array:
    return jnp.where(mask, w, 0)


def _compensated(w: jax.Array, stats: LayerStatistics, mask: jax.Array, nm) -> jax.Array:
    return sparsegpt(w, stats.hessian, 0.0, mask=mask)[0]


@jax.jit
def relative_layer_error(w: jax.Array, w_new: jax.Array, hessian: jax.Array) -> jax.Array:
    """`||X w - X w_new||² / ||X w||²` over the calibration tokens X, from `hessian = XᵀX`:
    w, w_new [d_in, d_out], hessian [d_in, d_in] -> scalar float32 (0 when `X w` is zero)."""
    w, w_new = w.astype(jnp.float32), w_new.astype(jnp.float32)
    hessian = hessian.astype(jnp.float32)

    def energy(m):
        return jnp.sum(m * jnp.matmul(hessian, m, precision=jax.lax.Precision.HIGHEST))

    dense = energy(w)
    return jnp.where(dense > 0, energy(w - w_new) / jnp.where(dense > 0, dense, 1.0), 0.0)


# The registry of one-shot methods by name; `register_one_shot` adds one (ARMOR, in armor.py).
ONE_SHOT_METHODS = {
    "magnitude": OneShotMethod(
        lambda w, stats, sparsity, nm: _masked(w, magnitude_mask(w, sparsity, nm)), _zeroed
    ),
    "wanda": OneShotMethod(
        lambda w, stats, sparsity, nm: _masked(w, wanda_mask(w, stats.sq_norms, sparsity, nm)),
        _zeroed,
    ),
    "sparsegpt": OneShotMethod(
        lambda w, stats, sparsity, nm: sparsegpt(w, stats.hessian, sparsity, nm), _compensated
    ),
}


def register_one_shot(name: str, method: OneShotMethod) -> OneShotMethod:
    """Adds `method` to `ONE_SHOT_METHODS` under `name` (a new name) and returns it."""
    require(name not in ONE_SHOT_METHODS, "one-shot method name", name, "a name not yet taken")
    ONE_SHOT_METHODS[name] = method
    return method


def _masked(w: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.where(mask, w, 0), mask


def dsnot_refinement(
    w: jax.Array, stats: LayerStatistics, mask: jax.Array, nm: tuple[int, int] | None
) -> jax.Array:
    """DSnoT's swaps on `mask [d_in, d_out]` of the dense `w` from running statistics; inside
    each group of m inputs for an n:m mask, so the pattern holds."""
    mean, variance = stats.mean_and_variance()
    return _dsnot_moments(w, mask, mean, variance, jnp.sqrt(stats.sq_norms), nm and nm[1])


@functools.partial(jax.jit, static_argnums=5)
def _dsnot_moments(w, mask, mean, variance, norm, group_size):
    return dsnot_from_moments(w, mask, mean, variance, norm, group_size=group_size).mask


# Each refinement: `(dense w [d_in, d_out], stats, kept mask, nm) -> refined kept mask`.
ONE_SHOT_REFINEMENTS = {"dsnot": dsnot_refinement}
