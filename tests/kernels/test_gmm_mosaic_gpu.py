"""The Mosaic GPU grouped-matmul kernels, run by the Mosaic GPU interpreter on CPU, match the
float64 loop references: both orientations of gmm and tgmm, bfloat16 and float32, with empty
groups, rows past the groups and a local range of groups (`group_offset`).

The interpreter fills memory nothing has written with NaN, so an output element a kernel leaves
unwritten and the wrapper reads shows as a mismatch; its race detector (`detect_races`) also runs,
and raises on any race it finds between the asynchronous copies and the kernel's reads. It runs
WGMMA synchronously and in full float32, so neither the hardware's asynchrony nor its TF32
rounding is checked here.

Interpreting is slow: shapes stay small and hypothesis draws a few examples per case.
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas import gmm
from kernels_pallas.grouped_matmul import mosaic_gpu, reference

DTYPES = (jnp.bfloat16, jnp.float32)
INTERPRET = plgpu.InterpretGPUParams(detect_races=True)
# Both operands hold exact bfloat16 or float32 values and the kernels sum in float32, so only
# the float32 sums differ from the float64 reference.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-4}
# No shrinking: each interpreted call takes seconds, so a failure reports the example as drawn.
SETTINGS = hypothesis.settings(
    max_examples=3,
    deadline=None,
    derandomize=True,
    phases=(hypothesis.Phase.explicit, hypothesis.Phase.generate),
)


@st.composite
def grouped_rows(draw, max_rows: int = 100) -> tuple[int, np.ndarray, int, int]:
    """(m, group_sizes, group_offset, num_local): 1 to 3 local groups among up to two others,
    sizes drawn as cuts of the m rows (so empty groups and a sum under m both occur)."""
    m = draw(st.integers(1, max_rows))
    num_local = draw(st.integers(1, 3))
    before, after = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    cuts = sorted(draw(st.lists(st.integers(0, m), min_size=before + num_local + after)))
    group_sizes = np.diff([0, *cuts]).astype(np.int32)
    return m, group_sizes, before, num_local


def _normal(seed: int, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Standard normal values rounded to `dtype`, returned in float32 for the reference."""
    values = np.random.default_rng(seed).standard_normal(shape)
    return np.asarray(jnp.asarray(values, dtype).astype(jnp.float32))


@pytest.mark.parametrize("transpose_rhs", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@SETTINGS
@hypothesis.example(rows=(70, np.array([0, 0], np.int32), 0, 2), c=5, o=9, seed=0)
@hypothesis.example(rows=(130, np.array([3, 0, 64, 60], np.int32), 1, 2), c=33, o=17, seed=1)
@hypothesis.given(
    rows=grouped_rows(), c=st.integers(1, 40), o=st.integers(1, 40), seed=st.integers(0, 99)
)
def test_gmm_matches_loop_reference(transpose_rhs, dtype, rows, c, o, seed):
    m, group_sizes, group_offset, num_local = rows
    lhs = _normal(seed, (m, c), dtype)  # [m, c]
    rhs = _normal(seed + 1, (num_local, c, o), dtype)  # [g, c, o]
    operand = np.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    out = mosaic_gpu.gmm(
        jnp.asarray(lhs, dtype),
        jnp.asarray(operand, dtype),
        jnp.asarray(group_sizes),
        jnp.int32(group_offset),
        tiling=(64, 16, 32),
        transpose_rhs=transpose_rhs,
        out_dtype=jnp.float32,
        interpret=INTERPRET,
    )  # [m, o]
    expected = reference.gmm_reference(lhs, rhs, group_sizes, group_offset)
    np.testing.assert_allclose(np.asarray(out), expected, **TOLERANCE)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@SETTINGS
@hypothesis.example(rows=(70, np.array([0, 0], np.int32), 0, 2), k=5, n=9, seed=0)
@hypothesis.example(rows=(130, np.array([3, 0, 64, 60], np.int32), 1, 2), k=70, n=17, seed=1)
@hypothesis.given(
    rows=grouped_rows(), k=st.integers(1, 40), n=st.integers(1, 40), seed=st.integers(0, 99)
)
def test_tgmm_matches_loop_reference(dtype, rows, k, n, seed):
    m, group_sizes, group_offset, num_local = rows
    lhs = _normal(seed, (m, k), dtype)  # [m, k]
    dout = _normal(seed + 1, (m, n), dtype)  # [m, n]
    out = mosaic_gpu.tgmm(
        jnp.asarray(lhs, dtype),
        jnp.asarray(dout, dtype),
        jnp.asarray(group_sizes),
        jnp.int32(group_offset),
        num_local,
        tiling=(64, 64, 16),
        out_dtype=jnp.float32,
        interpret=INTERPRET,
    )  # [g, k, n]
    expected = reference.tgmm_reference(lhs, dout, group_sizes, group_offset, num_local)
    np.testing.assert_allclose(np.asarray(out), expected, **TOLERANCE)


def test_gmm_through_the_public_api_has_the_dense_references_value_and_gradients():
    """`gmm(impl="interpret", backend="mosaic_gpu")`: the value and both gradients of the bound
    gmm match the dense reference's: forward (gmm), lhs gradient (gmm, rhs transposed) and rhs
    gradient (tgmm) all run as this module's kernels."""
    group_sizes, group_offset = jnp.array([5, 0, 40, 30, 7], jnp.int32), 1
    lhs = jnp.asarray(_normal(0, (90, 24), jnp.float32))  # [m, k]
    rhs = jnp.asarray(_normal(1, (3, 24, 40), jnp.float32))  # [g, k, n]
    weights = jnp.asarray(_normal(2, (90, 40), jnp.float32))  # [m, n]

    def loss(gmm_fn, lhs, rhs):
        return jnp.sum(gmm_fn(lhs, rhs) * weights)

    kernels = functools.partial(
        gmm,
        group_sizes=group_sizes,
        group_offset=group_offset,
        impl="interpret",
        backend="mosaic_gpu",
        tiling=(64, 16, 32),
    )
    dense = functools.partial(
        reference.gmm_dense_reference, group_sizes=group_sizes, group_offset=group_offset
    )
    got = jax.value_and_grad(functools.partial(loss, kernels), argnums=(0, 1))(lhs, rhs)
    want = jax.value_and_grad(functools.partial(loss, dense), argnums=(0, 1))(lhs, rhs)
    for got_part, want_part in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(got_part, want_part, rtol=1e-4, atol=1e-3)
