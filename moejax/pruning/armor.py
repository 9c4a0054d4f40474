"""ARMOR (*High-Performance Semi-Structured Pruning via Adaptive Matrix Factorization*): a
trained linear layer `w [d_in, d_out]` (`y = x @ w`) is replaced, one shot after training, by
the product `P @ S @ Q` of an N:M-sparse core and two block-diagonal wrappers.

- `S [d_in, d_out]` keeps n of every m consecutive inputs of each output (2:4 by default), so it
  runs on sparse tensor cores; `P [d_in, d_in]` mixes the inputs and `Q [d_out, d_out]` the
  outputs, each within square blocks of `block_size`, so they cost a small share of a dense
  layer.
- The factors minimise the layer-wise proxy loss `tr((w - w')ᵀ H (w - w'))` of the effective
  weight `w' = P S Q`, with `H = Σ xᵀx` over the calibration tokens (`LayerStatistics`): the
  summed squared error of the layer's outputs.
- Start: `P = I`, `Q = I` and `S` a one-shot N:M pruning (SparseGPT by default), so the start is
  that pruner's result. Block coordinate descent then repeats, every step a least squares in
  its own factor (solved with `H + damp * mean(diag H) * I`, as SparseGPT damps it):
  (a) `Q` given `P`, `S`: the outputs of one block only see their own block of `Q`, so each
  block is an independent least squares, solved exactly;
  (b) `P` given `S`, `Q`: `H` couples the input blocks; one Gauss-Seidel sweep solves each
  block exactly given the others: `H_jj ΔP_j (B_j B_jᵀ) = [H E]_j B_jᵀ` with `B = S Q` and the
  current error `E`, a Kronecker system whose two factors invert separately;
  (c) the kept values of `S` given its mask, `P` and `Q`: preconditioned conjugate gradients on
  the masked normal equations (every step an exact line search);
  (d) a new N:M mask chosen by the one-entry saliency `s² · [PᵀHP]_ii · [QQᵀ]_cc` of a
  diagonal-Newton estimate of the dense core, refitted as in (c).
  Each step is kept only if it lowers the (undamped) proxy loss, so the loss never increases
  and ends no higher than the starting pruner's.

One iteration costs a few `d_in² d_out` products (one per sweep of (b), one per conjugate-
gradient step), and only `H`, never the calibration activations, is needed.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from moejax.errors import require
from moejax.pruning.one_shot import (
    LayerStatistics,
    OneShotMethod,
    register_one_shot,
    sparsegpt,
)
from moejax.pruning.patterns import nm_mask

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class ArmorResult:
    """`left [d_in, d_in]` (P) and `right [d_out, d_out]` (Q), block-diagonal; `core [d_in,
    d_out]` (S), N:M-sparse with kept entries `mask` (bool `[d_in, d_out]`); the effective
    weight is `left @ core @ right`. `loss_history [iterations + 1]` (float32): the proxy loss
    of the start, then after each iteration."""

    left: jax.Array
    core: jax.Array
    right: jax.Array
    mask: jax.Array
    loss_history: jax.Array

    @property
    def effective(self) -> jax.Array:
        """`left @ core @ right`: `[d_in, d_out]`."""
        product = jnp.matmul(self.left, self.core, precision=_HIGHEST)
        return jnp.matmul(product, self.right, precision=_HIGHEST)


def proxy_loss(w: jax.Array, w_effective: jax.Array, hessian: jax.Array) -> jax.Array:
    """`tr((w - w')ᵀ H (w - w'))`, the summed `‖x w - x w'‖²` over the calibration tokens:
    `w, w_effective [d_in, d_out]`, `hessian [d_in, d_in] = Σ xᵀx` -> scalar (float32 at
    least)."""
    dtype = jnp.promote_types(jnp.result_type(w, w_effective, hessian), jnp.float32)
    error = w.astype(dtype) - w_effective.astype(dtype)
    return _quadratic(error, hessian.astype(dtype))


def armor(
    w: jax.Array,
    hessian: jax.Array,
    nm: tuple[int, int] = (2, 4),
    *,
    block_size: int = 128,
    iterations: int = 20,
    core_steps: int = 8,
    start: tuple[jax.Array, jax.Array] | None = None,
    damp: float = 0.01,
) -> ArmorResult:
    """ARMOR (see the module docstring): `w ≈ P @ S @ Q` for `w [d_in, d_out]` and `hessian
    [d_in, d_in] = Σ xᵀx`.

    `nm=(n, m)`: S keeps n of every m consecutive inputs of each output. `block_size`: the side
    of P's and Q's diagonal blocks (at most `min(d_in, d_out)`; it must divide both).
    `iterations` rounds of the four steps; `core_steps` conjugate-gradient steps for S's values
    in each refit. `start`: `(pruned w [d_in, d_out], kept mask bool [d_in, d_out])` of an N:M
    pruner (at most n kept in each group), e.g. Wanda's or SparseGPT's; SparseGPT's (with this
    `damp`) when None. `damp` adds `damp * mean(diag H)` to H's diagonal in the solves; the
    loss that every kept step must lower is the undamped one.
    """
    require(getattr(w, "ndim", None) == 2, "w.shape", getattr(w, "shape", None), "[d_in, d_out]")
    d_in, d_out = w.shape
    require(hessian.shape == (d_in, d_in), "hessian.shape", hessian.shape, f"[{d_in}, {d_in}]")
    require(
        len(nm) == 2 and 0 < nm[0] <= nm[1] and d_in % nm[1] == 0,
        "nm",
        nm,
        f"(n, m) with 0 < n <= m and m dividing d_in={d_in}",
    )
    n, m = nm = (int(nm[0]), int(nm[1]))  # hashable: a static argument of the jitted descent
    require(block_size > 0, "block_size", block_size, "a positive integer")
    block_size = min(block_size, d_in, d_out)
    require(
        d_in % block_size == 0 and d_out % block_size == 0,
        "block_size",
        block_size,
        f"a divisor of d_in={d_in} and d_out={d_out} (after capping at min(d_in, d_out))",
    )
    require(iterations >= 0, "iterations", iterations, ">= 0")
    require(core_steps >= 0, "core_steps", core_steps, ">= 0")
    require(damp >= 0, "damp", damp, ">= 0")
    if start is None:
        start = sparsegpt(w, hessian, 1 - n / m, nm, block_size=m * max(1, 128 // m), damp=damp)
    pruned, mask = start
    require(pruned.shape == w.shape, "start[0].shape", pruned.shape, f"w's shape {w.shape}")
    require(mask.shape == w.shape, "start[1].shape", mask.shape, f"w's shape {w.shape}")
    most = int(np.max(np.sum(np.asarray(mask, bool).reshape(d_in // m, m, d_out), axis=1)))
    require(most <= n, "start[1]", f"{most} kept in a group", f"at most n={n} of every m={m}")
    # float32 at least; float64 when both inputs are (the tests' references).
    dtype = jnp.promote_types(jnp.promote_types(w.dtype, hessian.dtype), jnp.float32)
    mask = jnp.asarray(mask, bool)
    core = jnp.where(mask, jnp.asarray(pruned, dtype), 0)
    left, core, right, mask, history = _armor(
        w.astype(dtype),
        hessian.astype(dtype),
        core,
        mask,
        nm,
        block_size,
        iterations,
        core_steps,
        jnp.asarray(damp, dtype),
    )
    return ArmorResult(
        _block_diagonal(left), core, _block_diagonal(right), mask, history.astype(jnp.float32)
    )


def wrapper_block(d_in: int, d_out: int) -> int:
    """The wrappers' block size for a `[d_in, d_out]` layer in the paper's proportion (128 for
    4096-wide layers: the wrappers add about 12% to the weights a 2:4 core keeps): a power of
    two near `min(d_in, d_out) / 32` (at most 128, at least 1) that tiles both sides."""
    target = max(1, min(min(d_in, d_out) // 32, 128))
    return math.gcd(d_in, d_out, 1 << (target.bit_length() - 1))


def armor_prune(
    w: jax.Array, stats: LayerStatistics, sparsity: float, nm: tuple[int, int] | None
) -> tuple[jax.Array, jax.Array]:
    """ARMOR as a one-shot method (the signature of `one_shot.ONE_SHOT_METHODS`): `(P @ S @ Q
    [d_in, d_out] in w's dtype, S's kept mask bool [d_in, d_out])`.

    The returned weight is the dense product; the mask is the 2:4 core's, not a pattern of the
    product, so it must not be applied to it. `nm` is required (ARMOR is semi-structured);
    `sparsity` only has to agree with it (`1 - n/m`).
    """
    require(
        nm is not None, "nm", nm, "(n, m): ARMOR is semi-structured, it has no unstructured form"
    )
    n, m = nm
    require(
        abs(sparsity - (1 - n / m)) < 1e-6,
        "sparsity",
        sparsity,
        f"1 - n/m = {1 - n / m} for nm={nm}",
    )
    block_size = wrapper_block(*w.shape)
    result = armor(w, stats.hessian, nm, block_size=block_size)
    return result.effective.astype(w.dtype), result.mask


def _quadratic(error: jax.Array, hessian: jax.Array) -> jax.Array:
    """`tr(errorᵀ H error)`: error [d_in, d_out], hessian [d_in, d_in] -> scalar."""
    return jnp.sum(error * jnp.matmul(hessian, error, precision=_HIGHEST))


def _apply_left(blocks: jax.Array, x: jax.Array) -> jax.Array:
    """`P @ x` for P given by its diagonal blocks [nb, b, b]: x [nb * b, d] -> [nb * b, d]."""
    nb, b, _ = blocks.shape
    out = jnp.einsum("jab,jbd->jad", blocks, x.reshape(nb, b, -1), precision=_HIGHEST)
    return out.reshape(x.shape)


def _apply_right(x: jax.Array, blocks: jax.Array) -> jax.Array:
    """`x @ Q` for Q given by its diagonal blocks [nb, b, b]: x [d, nb * b] -> [d, nb * b]."""
    nb, b, _ = blocks.shape
    out = jnp.einsum("ika,kab->ikb", x.reshape(-1, nb, b), blocks, precision=_HIGHEST)
    return out.reshape(x.shape)


def _transpose(blocks: jax.Array) -> jax.Array:
    return jnp.swapaxes(blocks, 1, 2)


def _block_diagonal(blocks: jax.Array) -> jax.Array:
    """blocks [nb, b, b] -> the block-diagonal matrix [nb * b, nb * b]."""
    nb, b, _ = blocks.shape
    eye = jnp.eye(nb, dtype=blocks.dtype)
    return jnp.einsum("jk,jab->jakb", eye, blocks).reshape(nb * b, nb * b)


def _diagonal_blocks(x: jax.Array, b: int) -> jax.Array:
    """The diagonal blocks of x [nb * b, nb * b] -> [nb, b, b]."""
    nb = x.shape[0] // b
    index = jnp.arange(nb)
    return x.reshape(nb, b, nb, b)[index, :, index, :]


def _pinv(a: jax.Array) -> jax.Array:
    """Pseudo-inverse of symmetric positive semi-definite matrices [..., b, b] (a rank-deficient
    Gram matrix, e.g. of a dead input, still gives an exact minimiser)."""
    return jnp.linalg.pinv(a, hermitian=True)


def _loss(w, hessian, left, core, right):
    return _quadratic(w - _apply_right(_apply_left(left, core), right), hessian)


def _right_step(damped_w, damped, left, core, right):
    """Q's blocks minimising the damped loss given P and S: output block k only sees `Q_k`,
    so `Q_k = (A_kᵀ H A_k)⁺ A_kᵀ H w_k` with `A = P S`. -> [nb, b, b]."""
    nb, b, _ = right.shape
    a = _apply_left(left, core)  # [d_in, d_out]
    damped_a = jnp.matmul(damped, a, precision=_HIGHEST)  # [d_in, d_out]
    a = a.reshape(-1, nb, b)
    gram = jnp.einsum("ika,ikb->kab", a, damped_a.reshape(-1, nb, b), precision=_HIGHEST)
    rhs = jnp.einsum("ika,ikb->kab", a, damped_w.reshape(-1, nb, b), precision=_HIGHEST)
    return jnp.matmul(_pinv(gram), rhs, precision=_HIGHEST)


def _left_step(w, damped, left, core, right):
    """One Gauss-Seidel sweep over P's blocks, each the exact minimiser of the damped loss given
    the other blocks, S and Q: with `B = S Q` and `E = w - P B`, the optimality condition of
    block j, `H_jj P_j C_jj = H_jj P_j⁰ C_jj + [H E]_j B_jᵀ` (`C = B Bᵀ`), is a Kronecker
    system `(C_jj ⊗ H_jj) vec(ΔP_j) = vec(r_j)` that splits into `ΔP_j = H_jj⁻¹ r_j C_jj⁺`.
    -> [nb, b, b]."""
    nb, b, _ = left.shape
    d_in, d_out = w.shape
    basis = _apply_right(core, right)  # B = S Q: [d_in, d_out]
    rows = basis.reshape(nb, b, d_out)  # B_j
    row_gram = _pinv(jnp.einsum("jad,jbd->jab", rows, rows, precision=_HIGHEST))  # C_jj⁺
    hessian_inv = _pinv(_diagonal_blocks(damped, b))  # H_jj⁻¹: [nb, b, b]
    residual = jnp.matmul(damped, w - _apply_left(left, basis), precision=_HIGHEST)  # H E

    def block(j, carry):
        left, residual = carry
        r = jax.lax.dynamic_slice(residual, (j * b, 0), (b, d_out))  # [b, d_out]
        rhs = jnp.matmul(r, rows[j].T, precision=_HIGHEST)  # [b, b]
        step = hessian_inv[j] @ rhs @ row_gram[j]
        columns = jax.lax.dynamic_slice(damped, (0, j * b), (d_in, b))  # [d_in, b]
        change = jnp.matmul(step, rows[j], precision=_HIGHEST)  # [b, d_out]
        residual = residual - jnp.matmul(columns, change, precision=_HIGHEST)
        return left.at[j].add(step), residual

    left, _ = jax.lax.fori_loop(0, nb, block, (left, residual))
    return left


def _core_diagonal(damped, left, right):
    """The diagonal of the core's normal operator, `[PᵀHP]_ii [QQᵀ]_cc`: [d_in, d_out]."""
    b = left.shape[1]
    left_diag = jnp.einsum("jai,jab,jbi->ji", left, _diagonal_blocks(damped, b), left)
    right_diag = jnp.einsum("kce,kce->kc", right, right)
    return jnp.outer(left_diag.reshape(-1), right_diag.reshape(-1))


def _refit_core(damped_w, damped, left, core, right, mask, steps):
    """S's kept values minimising the damped loss given its mask, P and Q: `steps` of
    Jacobi-preconditioned conjugate gradients on `mask ⊙ Pᵀ H (P S Q) Qᵀ = mask ⊙ Pᵀ H w Qᵀ`,
    started from `core`. -> [d_in, d_out]."""
    left_t, right_t = _transpose(left), _transpose(right)

    def normal(s):
        product = _apply_right(_apply_left(left, s), right)  # P s Q
        back = _apply_left(left_t, jnp.matmul(damped, product, precision=_HIGHEST))
        return jnp.where(mask, _apply_right(back, right_t), 0)

    rhs = jnp.where(mask, _apply_right(_apply_left(left_t, damped_w), right_t), 0)
    diagonal = _core_diagonal(damped, left, right)
    precondition = jnp.where(diagonal > 0, 1 / jnp.where(diagonal > 0, diagonal, 1), 0)
    residual = rhs - normal(core)
    z = residual * precondition
    rz = jnp.sum(residual * z)

    def step(_, carry):
        core, residual, direction, rz = carry
        curved = normal(direction)
        curvature = jnp.sum(direction * curved)
        alpha = jnp.where(curvature > 0, rz / jnp.where(curvature > 0, curvature, 1), 0)
        core = core + alpha * direction
        residual = residual - alpha * curved
        z = residual * precondition
        rz_next = jnp.sum(residual * z)
        beta = jnp.where(rz > 0, rz_next / jnp.where(rz > 0, rz, 1), 0)
        return core, residual, z + beta * direction, rz_next

    core, *_ = jax.lax.fori_loop(0, steps, step, (core, residual, z, rz))
    return core


def _propose_mask(damped_w, damped, left, core, right, n, m):
    """A new N:M mask and starting values: one diagonal-Newton step of the dense core,
    `s = S + [Pᵀ H E Qᵀ] / d` (`d` the normal operator's diagonal), kept by the saliency
    `s² d`, the loss of zeroing one entry alone. -> (values, mask), both [d_in, d_out]."""
    effective = _apply_right(_apply_left(left, core), right)
    gradient = damped_w - jnp.matmul(damped, effective, precision=_HIGHEST)  # H E
    gradient = _apply_right(_apply_left(_transpose(left), gradient), _transpose(right))
    diagonal = _core_diagonal(damped, left, right)
    dense = core + gradient / jnp.where(diagonal > 0, diagonal, 1)
    mask = nm_mask(dense**2 * diagonal, n, m, 0)
    return jnp.where(mask, dense, 0), mask


@functools.partial(jax.jit, static_argnums=(4, 5, 6, 7))
def _armor(w, hessian, core, mask, nm, block_size, iterations, core_steps, damp):
    d_in, d_out = w.shape
    dtype = w.dtype
    damped = hessian + damp * jnp.mean(jnp.diag(hessian)) * jnp.eye(d_in, dtype=dtype)
    damped_w = jnp.matmul(damped, w, precision=_HIGHEST)  # [d_in, d_out]
    eye = jnp.eye(block_size, dtype=dtype)
    left = jnp.tile(eye, (d_in // block_size, 1, 1))  # [nb_in, b, b]
    right = jnp.tile(eye, (d_out // block_size, 1, 1))  # [nb_out, b, b]

    def loss_of(left, core, right):
        return _loss(w, hessian, left, core, right)

    def accept(loss, candidate, new_loss, current):
        """The candidate factors when they lower the proxy loss (a tie or NaN keeps the
        current ones: with `H = 0` every candidate ties, and none may replace w)."""
        better = new_loss < loss
        chosen = jax.tree.map(lambda a, b: jnp.where(better, a, b), candidate, current)
        return chosen, jnp.where(better, new_loss, loss)

    def iteration(state, _):
        left, core, right, mask, loss = state
        right_new = _right_step(damped_w, damped, left, core, right)
        right, loss = accept(loss, right_new, loss_of(left, core, right_new), right)
        left_new = _left_step(w, damped, left, core, right)
        left, loss = accept(loss, left_new, loss_of(left_new, core, right), left)
        core_new = _refit_core(damped_w, damped, left, core, right, mask, core_steps)
        core, loss = accept(loss, core_new, loss_of(left, core_new, right), core)
        values, proposed = _propose_mask(damped_w, damped, left, core, right, *nm)
        values = _refit_core(damped_w, damped, left, values, right, proposed, core_steps)
        (core, mask), loss = accept(
            loss, (values, proposed), loss_of(left, values, right), (core, mask)
        )
        return (left, core, right, mask, loss), loss

    start = loss_of(left, core, right)
    (left, core, right, mask, _), losses = jax.lax.scan(
        iteration, (left, core, right, mask, start), None, length=iterations
    )
    return left, core, right, mask, jnp.concatenate([start[None], losses])


def _armor_rebuild(
    w: jax.Array, stats: LayerStatistics, mask: jax.Array, nm: tuple[int, int] | None
) -> jax.Array:
    """ARMOR's effective weight `[d_in, d_out]` started from an n:m core mask chosen elsewhere
    (a DSnoT-refined one): SparseGPT's weights for that mask, then the same descent."""
    require(nm is not None, "nm", nm, "(n, m): ARMOR is semi-structured")
    start = sparsegpt(w, stats.hessian, 0.0, mask=mask)[0], mask
    result = armor(w, stats.hessian, nm, block_size=wrapper_block(*w.shape), start=start)
    return result.effective.astype(w.dtype)


ARMOR = register_one_shot("armor", OneShotMethod(armor_prune, _armor_rebuild))
