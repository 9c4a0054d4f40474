"""Our Pallas grouped-matmul kernels, run by the interpreters on CPU, against float64 references.

Shapes are fixed per test and group sizes and offsets are traced, so each test compiles its
interpreted kernels once and hypothesis only varies the data: the interpreters are slow to
compile, quick to run on these small grids.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import gmm
from kernels_pallas.grouped_matmul import (
    gmm_dense_reference,
    gmm_reference,
    gpu,
    metadata,
    tgmm_reference,
    tpu,
)

KERNELS = {"tpu": tpu, "gpu": gpu}
ROWS, K, N, NUM_GROUPS = 37, 12, 10, 5  # 37 rows: no tile size used here divides it
TILING = (8, 8, 8)  # several tiles along every axis, a ragged last one along each
# Out-of-bounds reads raise; memory the kernel did not write reads as NaN.
TPU_CHECKS = pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")


@st.composite
def group_problems(draw: st.DrawFn) -> tuple[list[int], int, int, int]:
    """NUM_GROUPS sizes (zeros allowed, summing to at most ROWS), a local range and a seed."""
    sizes = draw(st.lists(st.integers(0, 9), min_size=NUM_GROUPS, max_size=NUM_GROUPS))
    for i in range(NUM_GROUPS):  # the groups fill at most ROWS rows
        sizes[i] = min(sizes[i], ROWS - sum(sizes[:i]))
    if draw(st.booleans()):
        sizes[-1] += ROWS - sum(sizes)  # no trailing rows
    num_local = draw(st.sampled_from([NUM_GROUPS, 3]))
    group_offset = draw(st.integers(0, NUM_GROUPS - num_local))
    return sizes, group_offset, num_local, draw(st.integers(0, 2**31 - 1))


def _operands(
    num_local: int, seed: int, dtype: jnp.dtype, rows: int = ROWS, k: int = K, n: int = N
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lhs = rng.standard_normal((rows, k)).astype(dtype)
    rhs = rng.standard_normal((num_local, k, n)).astype(dtype)
    dout = rng.standard_normal((rows, n)).astype(dtype)
    return lhs, rhs, dout


@functools.partial(jax.jit, static_argnames=("backend", "interpret"))
def _all_kernels(lhs, rhs, dout, group_sizes, group_offset, *, backend, interpret):
    """gmm, gmm against rhs transposed, and tgmm, each from an output poisoned with NaN."""
    kernels = KERNELS[backend]
    common = dict(tiling=TILING, interpret=interpret, poison=True)
    out = kernels.gmm(
        lhs, rhs, group_sizes, group_offset, transpose_rhs=False, out_dtype=lhs.dtype, **common
    )
    out_t = kernels.gmm(
        lhs,
        rhs.transpose(0, 2, 1),
        group_sizes,
        group_offset,
        transpose_rhs=True,
        out_dtype=lhs.dtype,
        **common,
    )
    drhs = kernels.tgmm(
        lhs, dout, group_sizes, group_offset, rhs.shape[0], out_dtype=lhs.dtype, **common
    )
    return out, out_t, drhs


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@settings(max_examples=12, deadline=None)
@given(group_problems())
@example(([0, 0, 0, 0, 0], 0, NUM_GROUPS, 0))  # no rows in any group
@example(([ROWS, 0, 0, 0, 0], 0, NUM_GROUPS, 1))  # one group takes every row
@example(([3, 0, 0, 9, 1], 2, 3, 2))  # an empty local group first, a tail after the last
def test_kernels_from_poisoned_outputs_match_float64_loop_reference(
    backend: str, problem: tuple
) -> None:
    sizes, group_offset, num_local, seed = problem
    with jax.enable_x64(True):
        lhs, rhs, dout = _operands(num_local, seed, np.float64)
        group_sizes = np.asarray(sizes, np.int32)
        out, out_t, drhs = _all_kernels(
            lhs, rhs, dout, group_sizes, np.int32(group_offset), backend=backend, interpret=True
        )
        expected = gmm_reference(lhs, rhs, group_sizes, group_offset)
        # NaN-poisoned outputs: an element no program wrote would fail here, not pass as 0.
        np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(out_t, expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(
            drhs,
            tgmm_reference(lhs, dout, group_sizes, group_offset, num_local),
            rtol=1e-12,
            atol=1e-12,
        )


def test_poison_catches_a_kernel_that_skips_the_tiles_of_no_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The poisoned-output check can fail: drop the visits of tiles no local group holds."""
    real_visits = metadata.row_tile_visits

    def visits_of_group_tiles_only(starts, ends, m_tiles, tm):
        tile_ids, group_ids, row_starts, row_ends = real_visits(starts, ends, m_tiles, tm)
        owned = row_ends > row_starts
        # Visits of no group re-point at a tile a group holds, so their tiles are never visited.
        tile_ids = jnp.where(owned, tile_ids, tile_ids[jnp.argmax(owned)])
        return tile_ids, group_ids, row_starts, row_ends

    monkeypatch.setattr(metadata, "row_tile_visits", visits_of_group_tiles_only)
    lhs, rhs, _ = _operands(2, seed=3, dtype=np.float32)
    group_sizes = np.asarray([9, 11, 6, 0, 0], np.int32)  # local rows 9..25 of 37
    out = tpu.gmm(
        jnp.asarray(lhs),
        jnp.asarray(rhs),
        jnp.asarray(group_sizes),
        jnp.int32(1),
        tiling=TILING,
        transpose_rhs=False,
        out_dtype=jnp.float32,
        interpret=True,
        poison=True,
    )
    untouched = np.isnan(np.asarray(out)).all(axis=1)
    # Tiles 0 (rows 0..7) and 4 (rows 32..36) hold no local row; the others are written whole.
    expected = np.r_[0:8, 32:ROWS]
    np.testing.assert_array_equal(np.flatnonzero(untouched), expected)


def test_tpu_interpreter_catches_a_visit_past_the_last_tile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The TPU interpreter's bounds check can fail where the generic interpreter clamps."""
    real_visits = metadata.row_tile_visits

    def visits_one_tile_too_far(starts, ends, m_tiles, tm):
        tile_ids, *rest = real_visits(starts, ends, m_tiles, tm)
        return tile_ids.at[-1].set(m_tiles), *rest

    monkeypatch.setattr(metadata, "row_tile_visits", visits_one_tile_too_far)
    lhs, rhs, _ = _operands(3, seed=3, dtype=np.float32, k=8, n=8)
    with pytest.raises(jax.errors.JaxRuntimeError, match="Out-of-bounds block index"):
        out = tpu.gmm(
            jnp.asarray(lhs),
            jnp.asarray(rhs),
            jnp.asarray([9, 11, 6], np.int32),
            jnp.int32(0),
            tiling=TILING,
            transpose_rhs=False,
            out_dtype=jnp.float32,
            interpret=TPU_CHECKS,
        )
        jax.block_until_ready(out)


@settings(max_examples=8, deadline=None)
@given(group_problems())
@example(([0, 0, 0, 0, 0], 0, NUM_GROUPS, 0))
def test_interpret_gradients_match_jax_grad_of_dense_reference(problem: tuple) -> None:
    sizes, group_offset, num_local, seed = problem
    with jax.enable_x64(True):
        lhs, rhs, cotangent = _operands(num_local, seed, np.float64)
        group_sizes = np.asarray(sizes, np.int32)
        for backend in ("gpu", "tpu"):
            grads = _kernel_grads(lhs, rhs, cotangent, group_sizes, group_offset, backend)
            expected = _reference_grads(lhs, rhs, cotangent, group_sizes, group_offset)
            for grad, want in zip(grads, expected, strict=True):
                np.testing.assert_allclose(grad, want, rtol=1e-12, atol=1e-12)


@functools.partial(jax.jit, static_argnames="backend")
def _kernel_grads(lhs, rhs, cotangent, group_sizes, group_offset, backend):
    def loss(lhs, rhs):
        out = gmm(
            lhs,
            rhs,
            group_sizes,
            impl="interpret",
            backend=backend,
            tiling=TILING,
            group_offset=group_offset,
        )
        return jnp.sum(out * cotangent)

    return jax.grad(loss, argnums=(0, 1))(lhs, rhs)


@functools.partial(jax.jit, static_argnames="group_offset")
def _reference_grads(lhs, rhs, cotangent, group_sizes, group_offset):
    def loss(lhs, rhs):
        return jnp.sum(gmm_dense_reference(lhs, rhs, group_sizes, group_offset) * cotangent)

    return jax.grad(loss, argnums=(0, 1))(lhs, rhs)


def test_tpu_kernel_under_tpu_interpreter_checks_matches_reference_with_gradients() -> None:
    sizes, group_offset, num_local = [4, 0, 13, 9, 2], 1, 3  # tail of 9 rows, an empty group
    # One tile along k and n keeps this slow interpreter's grids short; rows still span 5 tiles.
    lhs, rhs, cotangent = _operands(num_local, seed=4, dtype=np.float32, k=8, n=8)
    group_sizes = np.asarray(sizes, np.int32)

    def loss(lhs, rhs):
        out = gmm(
            lhs,
            rhs,
            group_sizes,
            impl="interpret",
            interpret_params=TPU_CHECKS,
            tiling=TILING,
            group_offset=group_offset,
        )
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(lhs, rhs)
    np.testing.assert_allclose(
        out, gmm_reference(lhs, rhs, group_sizes, group_offset), rtol=1e-5, atol=1e-5
    )
    expected = _reference_grads(lhs, rhs, cotangent, group_sizes, group_offset)
    for grad, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_kernels_accumulate_bf16_in_float32(backend: str) -> None:
    lhs, rhs, _ = _operands(4, seed=5, dtype=np.float32, rows=29, k=128, n=8)
    lhs, rhs = jnp.asarray(lhs, jnp.bfloat16), jnp.asarray(rhs, jnp.bfloat16)
    group_sizes = np.asarray([11, 0, 9, 6], np.int32)
    run = jax.jit(
        lambda a, b, dtype: gmm(
            a,
            b,
            group_sizes,
            impl="interpret",
            backend=backend,
            tiling=(8, 32, 8),
            preferred_element_type=dtype,
        ),
        static_argnums=2,
    )
    wide = run(lhs, rhs, jnp.float32)
    chex.assert_type(wide, jnp.float32)
    # Exact products of bf16 values summed in float32 over 4 k tiles: float32 round-off only.
    reference = gmm_reference(lhs.astype(jnp.float32), rhs.astype(jnp.float32), group_sizes)
    np.testing.assert_allclose(wide, reference, rtol=1e-5, atol=1e-4)
    narrow = run(lhs, rhs, jnp.bfloat16)
    chex.assert_type(narrow, jnp.bfloat16)
    # The bf16 output is the float32 accumulation rounded once, not a bf16 running sum.
    np.testing.assert_array_equal(narrow, wide.astype(jnp.bfloat16))


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_bf16_gradients_keep_input_dtype_and_match_float32(backend: str) -> None:
    lhs, rhs, cotangent = _operands(3, seed=6, dtype=np.float32, rows=21, k=16, n=8)
    group_sizes = np.asarray([7, 0, 10], np.int32)

    @jax.jit
    def grads(lhs, rhs):
        def loss(lhs, rhs):
            out = gmm(
                lhs,
                rhs,
                group_sizes,
                impl="interpret",
                backend=backend,
                tiling=TILING,
                preferred_element_type=jnp.float32,
            )
            return jnp.sum(out * cotangent)

        return jax.grad(loss, argnums=(0, 1))(lhs, rhs)

    narrow = grads(jnp.asarray(lhs, jnp.bfloat16), jnp.asarray(rhs, jnp.bfloat16))
    chex.assert_type(narrow, jnp.bfloat16)
    wide = _reference_grads(
        jnp.asarray(lhs, jnp.bfloat16).astype(jnp.float32),
        jnp.asarray(rhs, jnp.bfloat16).astype(jnp.float32),
        cotangent,
        group_sizes,
        0,
    )
    # bf16 rounding of the cotangent and of the result, on top of float32 sums.
    for grad, want in zip(narrow, wide, strict=True):
        np.testing.assert_allclose(grad.astype(jnp.float32), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("group_sizes", [[0, 0, 0], []], ids=["empty-groups", "no-groups"])
@pytest.mark.parametrize("rows", [0, 5])
def test_interpret_handles_no_rows_in_any_group(group_sizes: list[int], rows: int) -> None:
    lhs, rhs, _ = _operands(len(group_sizes), seed=7, dtype=np.float32, rows=rows, k=4, n=3)
    out, grads = jax.value_and_grad(
        lambda a, b: jnp.sum(gmm(a, b, np.asarray(group_sizes, np.int32), impl="interpret")),
        argnums=(0, 1),
    )(lhs, rhs)
    np.testing.assert_array_equal(out, 0.0)
    chex.assert_trees_all_equal(grads, (np.zeros_like(lhs), np.zeros_like(rhs)))


def test_interpret_default_kernel_is_gpu_unless_tpu_interpreter_params_are_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    called = []
    for name, module in KERNELS.items():
        monkeypatch.setattr(module, "gmm", _recording(module.gmm, called, name))
    lhs, rhs, _ = _operands(2, seed=8, dtype=np.float32, rows=6, k=3, n=2)
    group_sizes = np.asarray([2, 3], np.int32)
    # Tracing is enough to see which kernel is launched and how.
    jax.eval_shape(lambda: gmm(lhs, rhs, group_sizes, impl="interpret"))
    jax.eval_shape(
        lambda: gmm(lhs, rhs, group_sizes, impl="interpret", interpret_params=TPU_CHECKS)
    )
    jax.eval_shape(lambda: gmm(lhs, rhs, group_sizes, impl="interpret", backend="tpu"))
    assert called == [("gpu", True), ("tpu", TPU_CHECKS), ("tpu", True)]


def _recording(kernel, called: list, name: str):
    def run(*args, interpret, **kwargs):
        called.append((name, interpret))
        return kernel(*args, interpret=interpret, **kwargs)

    return run


@pytest.mark.accelerator
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_kernels_match_reference_on_the_accelerator(dtype: jnp.dtype) -> None:
    group_sizes = np.asarray([300, 0, 517, 64, 1, 0, 250, 100], np.int32)  # 1232 of 1300 rows
    lhs, rhs, cotangent = _operands(len(group_sizes), 9, np.float32, rows=1300, k=256, n=384)
    lhs, rhs = jnp.asarray(lhs, dtype), jnp.asarray(rhs, dtype)

    def loss(lhs, rhs):
        out = gmm(lhs, rhs, group_sizes, impl="pallas", preferred_element_type=jnp.float32)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(lhs, rhs)
    wide_lhs, wide_rhs = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
    tolerance = 2e-2 if dtype == jnp.bfloat16 else 2e-3  # TPU f32 matmuls may pass through bf16
    np.testing.assert_allclose(
        out, gmm_reference(wide_lhs, wide_rhs, group_sizes), rtol=tolerance, atol=tolerance
    )
    expected = _reference_grads(wide_lhs, wide_rhs, cotangent, group_sizes, 0)
    for grad, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(grad.astype(jnp.float32), want, rtol=5e-2, atol=5e-2)
