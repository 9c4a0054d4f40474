"""ARMOR: each step's closed form against a float64 brute-force least squares on the vectorised
problem (column-major `vec(A X B) = (Bᵀ ⊗ A) vec(X)`), and the guarantees of the whole
descent (a loss that never increases and ends below the starting pruner's, exact n:m, block-
diagonal wrappers)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.pruning import armor as armor_module
from moejax.pruning.armor import armor, armor_prune, proxy_loss
from moejax.pruning.one_shot import (
    ONE_SHOT_METHODS,
    LayerStatistics,
    accumulate,
    sparsegpt,
    wanda_mask,
)

NM = (2, 4)


def _layer(seed: int, d_in: int = 64, d_out: int = 32, tokens: int = 256):
    """A weight and correlated inputs (so the Hessian is far from diagonal)."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d_in, d_in)) / np.sqrt(d_in) + np.eye(d_in)
    x = rng.normal(size=(tokens, d_in)) @ mixing * rng.uniform(0.2, 3.0, size=d_in)
    return rng.normal(size=(d_in, d_out)), x


def _block_diagonal(blocks: np.ndarray) -> np.ndarray:
    nb, b, _ = blocks.shape
    full = np.zeros((nb * b, nb * b))
    for j in range(nb):
        full[j * b : (j + 1) * b, j * b : (j + 1) * b] = blocks[j]
    return full


def _on_blocks(size: int, b: int) -> np.ndarray:
    return np.kron(np.eye(size // b), np.ones((b, b))).astype(bool)


def _masked_lstsq(design: np.ndarray, target: np.ndarray, free: np.ndarray) -> np.ndarray:
    """argmin over X (zero outside `free`) of ‖design vec(X) - target‖, vec column-major."""
    columns = np.flatnonzero(free.reshape(-1, order="F"))
    solution = np.linalg.lstsq(design[:, columns], target, rcond=None)[0]
    x = np.zeros(free.size)
    x[columns] = solution
    return x.reshape(free.shape, order="F")


def _tiny(seed: int, d_in: int = 8, d_out: int = 8, b: int = 4):
    """float64 factors of a tiny problem: w, H, damped H and its factor Lᵀ (`H_d = L Lᵀ`),
    P and Q blocks near the identity, and a 2:4 core with its mask."""
    w, x = _layer(seed, d_in, d_out, tokens=40)
    rng = np.random.default_rng(seed + 100)
    hessian = x.T @ x
    damped = hessian + 0.01 * np.mean(np.diag(hessian)) * np.eye(d_in)
    left = np.eye(b) + 0.3 * rng.normal(size=(d_in // b, b, b))
    right = np.eye(b) + 0.3 * rng.normal(size=(d_out // b, b, b))
    mask = np.asarray(armor_module.nm_mask(jnp.asarray(rng.uniform(size=w.shape)), *NM, 0))
    core = np.where(mask, rng.normal(size=w.shape), 0.0)
    factor = np.linalg.cholesky(damped).T
    return w, hessian, damped, factor, left, core, mask, right


@pytest.fixture(scope="module")
def fitted():
    """ARMOR 2:4 with 8-wide blocks on a correlated 64 x 32 layer, from SparseGPT 2:4."""
    w, x = _layer(0)
    w, hessian = jnp.asarray(w, jnp.float32), jnp.asarray(x.T @ x, jnp.float32)
    start = sparsegpt(w, hessian, 0.5, NM)
    return w, hessian, start, armor(w, hessian, NM, block_size=8, iterations=10, start=start)


def test_loss_never_increases_and_ends_well_below_sparsegpt(fitted):
    w, hessian, (pruned, _), result = fitted
    history = np.asarray(result.loss_history)
    assert history.shape == (11,)
    assert np.all(np.diff(history) <= 0)
    sparsegpt_loss = float(proxy_loss(w, pruned, hessian))
    np.testing.assert_allclose(history[0], sparsegpt_loss, rtol=1e-5)
    assert history[-1] < 0.5 * sparsegpt_loss
    np.testing.assert_allclose(proxy_loss(w, result.effective, hessian), history[-1], rtol=1e-3)
    # Without `start`, the start is SparseGPT 2:4 (same shapes: no new compile).
    default = armor(w, hessian, NM, block_size=8, iterations=10)
    np.testing.assert_allclose(default.loss_history[0], sparsegpt_loss, rtol=1e-5)


def test_ends_below_a_wanda_start(fitted):
    w, hessian, _, _ = fitted
    x_norms = jnp.diag(hessian)  # Σ x_i², what Wanda reads
    mask = wanda_mask(w, x_norms, 0.5, NM)
    start = (jnp.where(mask, w, 0), mask)
    result = armor(w, hessian, NM, block_size=8, iterations=10, start=start)
    history = np.asarray(result.loss_history)
    np.testing.assert_allclose(history[0], proxy_loss(w, start[0], hessian), rtol=1e-5)
    assert np.all(np.diff(history) <= 0) and history[-1] < 0.5 * history[0]


def test_core_is_exactly_n_m_and_wrappers_are_block_diagonal(fitted):
    w, _, (_, start_mask), result = fitted
    mask, core = np.asarray(result.mask), np.asarray(result.core)
    d_in, d_out = w.shape
    np.testing.assert_array_equal(mask.reshape(d_in // 4, 4, d_out).sum(axis=1), 2)
    assert np.any(mask != np.asarray(start_mask))  # some mask updates were kept
    assert np.all(core[~mask] == 0)
    for wrapper, size in ((result.left, d_in), (result.right, d_out)):
        wrapper = np.asarray(wrapper)
        assert wrapper.shape == (size, size)
        assert np.all(wrapper[~_on_blocks(size, 8)] == 0)
        assert not np.allclose(wrapper, np.eye(size), atol=1e-2)  # the wrappers did move


def test_misleading_damping_keeps_every_step_that_would_raise_the_loss_out(fitted):
    """With `damp=100` the solves fit a nearly unweighted loss; each of their steps raises the
    proxy loss here, so none is kept and the result is the start itself."""
    w, hessian, (pruned, mask), _ = fitted
    result = armor(w, hessian, NM, block_size=8, iterations=10, start=(pruned, mask), damp=100.0)
    history = np.asarray(result.loss_history)
    np.testing.assert_array_equal(history, history[0])
    np.testing.assert_array_equal(result.mask, mask)
    np.testing.assert_allclose(result.effective, pruned, atol=1e-6)


def test_right_step_is_the_float64_least_squares_minimiser():
    w, _, damped, factor, left, core, _, right = _tiny(1)
    with jax.enable_x64(True):
        ours = armor_module._right_step(
            jnp.asarray(damped @ w),
            jnp.asarray(damped),
            jnp.asarray(left),
            jnp.asarray(core),
            jnp.asarray(right),
        )
        ours = _block_diagonal(np.asarray(ours))
    a = _block_diagonal(left) @ core
    design = np.kron(np.eye(w.shape[1]), factor @ a)  # vec(Lᵀ A Q) = (I ⊗ Lᵀ A) vec(Q)
    target = (factor @ w).reshape(-1, order="F")
    expected = _masked_lstsq(design, target, _on_blocks(w.shape[1], 4))
    np.testing.assert_allclose(ours, expected, rtol=1e-8, atol=1e-10)


def test_left_sweep_solves_each_block_exactly_and_converges_to_the_joint_minimiser():
    w, _, damped, factor, left, core, _, right = _tiny(2)
    basis = core @ _block_diagonal(right)  # B = S Q
    design = np.kron(basis.T, factor)  # vec(Lᵀ P B) = (Bᵀ ⊗ Lᵀ) vec(P)
    target = (factor @ w).reshape(-1, order="F")
    with jax.enable_x64(True):
        sweep = jax.jit(armor_module._left_step)
        args = (jnp.asarray(w), jnp.asarray(damped))
        once = np.asarray(sweep(*args, jnp.asarray(left), jnp.asarray(core), jnp.asarray(right)))
        # The last block is solved last: the exact minimiser given the others as they end.
        others = _block_diagonal(np.concatenate([once[:-1], np.zeros_like(once[-1:])]))
        last = np.zeros((8, 8), bool)
        last[4:, 4:] = True
        rest = (factor @ (w - others @ basis)).reshape(-1, order="F")
        np.testing.assert_allclose(
            _block_diagonal(once)[4:, 4:], _masked_lstsq(design, rest, last)[4:, 4:], rtol=1e-8
        )
        # Gauss-Seidel on a positive-definite quadratic: the sweeps reach the joint minimiser.
        blocks = jnp.asarray(left)
        for _ in range(300):
            blocks = sweep(*args, blocks, jnp.asarray(core), jnp.asarray(right))
    expected = _masked_lstsq(design, target, _on_blocks(8, 4))
    np.testing.assert_allclose(_block_diagonal(np.asarray(blocks)), expected, rtol=1e-6, atol=1e-8)


def test_core_refit_reaches_the_masked_float64_least_squares():
    w, _, damped, factor, left, core, mask, right = _tiny(3)
    kept = int(mask.sum())
    with jax.enable_x64(True):
        ours = armor_module._refit_core(
            jnp.asarray(damped @ w),
            jnp.asarray(damped),
            jnp.asarray(left),
            jnp.asarray(core),
            jnp.asarray(right),
            jnp.asarray(mask),
            kept,
        )
        ours = np.asarray(ours)
    p, q = _block_diagonal(left), _block_diagonal(right)
    design = np.kron(q.T, factor @ p)  # vec(Lᵀ P S Q) = (Qᵀ ⊗ Lᵀ P) vec(S)
    expected = _masked_lstsq(design, (factor @ w).reshape(-1, order="F"), mask)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-8)
    assert np.all(ours[~mask] == 0)


def test_armor_prune_returns_the_product_in_w_dtype_below_sparsegpt():
    w, x = _layer(4, d_in=16, d_out=8, tokens=64)
    stats = accumulate(LayerStatistics.zeros(16), jnp.asarray(x, jnp.float32))
    w = jnp.asarray(w, jnp.bfloat16)
    effective, mask = armor_prune(w, stats, 0.5, NM)
    assert effective.dtype == jnp.bfloat16 and mask.shape == (16, 8)
    np.testing.assert_array_equal(np.asarray(mask).reshape(4, 4, 8).sum(axis=1), 2)
    pruned, _ = sparsegpt(w, stats.hessian, 0.5, NM)
    w32 = w.astype(jnp.float32)
    ours = proxy_loss(w32, effective.astype(jnp.float32), stats.hessian)
    assert ours < proxy_loss(w32, pruned.astype(jnp.float32), stats.hessian)


def test_rebuilding_sparsegpts_own_mask_is_armor_prune():
    """The registered method's `rebuild` (what a refinement's mask goes through) runs the same
    descent as `armor_prune` on the same wrappers: given SparseGPT's own 2:4 mask it returns
    `armor_prune`'s weight, and its wrappers are `wrapper_block` wide, not wider."""
    w, x = _layer(5, d_in=64, d_out=128, tokens=256)
    stats = accumulate(LayerStatistics.zeros(64), jnp.asarray(x, jnp.float32))
    w = jnp.asarray(w, jnp.float32)
    _, own_mask = sparsegpt(w, stats.hessian, 0.5, NM)
    method = ONE_SHOT_METHODS["armor"]
    rebuilt = method.rebuild(w, stats, own_mask, NM)
    np.testing.assert_allclose(rebuilt, armor_prune(w, stats, 0.5, NM)[0], rtol=1e-4, atol=1e-5)
    assert armor_module.wrapper_block(64, 128) == 2


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"block_size": 12}, "block_size"),
        ({"nm": (2, 5)}, "nm"),
        ({"nm": (0, 4)}, "nm"),
        ({"iterations": -1}, "iterations"),
        ({"damp": -0.1}, "damp"),
        ({"hessian": np.eye(32)}, "hessian.shape"),
        ({"w": np.zeros(64)}, "w.shape"),
        ({"start": (np.zeros((64, 32)), np.ones((64, 32), bool))}, "start[1]"),
        ({"start": (np.zeros((32, 32)), np.ones((32, 32), bool))}, "start[0].shape"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    args = {"w": np.ones((64, 32)), "hessian": np.eye(64)} | kwargs
    w, hessian = jnp.asarray(args.pop("w")), jnp.asarray(args.pop("hessian"))
    with pytest.raises(ValueError, match=f"^{field.replace('[', r'\[')}"):
        armor(w, hessian, **args)


@pytest.mark.parametrize(
    ("sparsity", "nm", "field"), [(0.5, None, "nm"), (0.6, (2, 4), "sparsity")]
)
def test_armor_prune_refuses_unstructured_or_inconsistent_sparsity(sparsity, nm, field):
    stats = LayerStatistics.zeros(8)
    with pytest.raises(ValueError, match=f"^{field}"):
        armor_prune(jnp.ones((8, 8)), stats, sparsity, nm)


def test_without_calibration_signal_the_start_is_kept(fitted):
    """With `H = 0` every candidate ties with the start at loss 0; a tie must not replace it
    (the least squares would zero the wrappers)."""
    w, hessian, (pruned, mask), _ = fitted
    result = armor(
        w, jnp.zeros_like(hessian), NM, block_size=8, iterations=10, start=(pruned, mask)
    )
    np.testing.assert_array_equal(result.loss_history, 0)
    np.testing.assert_allclose(result.effective, pruned, atol=1e-6)
