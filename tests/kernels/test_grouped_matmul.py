"""kernels_pallas.gmm against a loop-over-groups float64 reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_pallas import GMM_IMPLS, gmm
from kernels_pallas.grouped_matmul import gmm_reference


@st.composite
def gmm_problems(draw: st.DrawFn) -> tuple[list[int], int, int, int, int]:
    """Group sizes (zeros allowed), trailing rows past the groups, k, n and a seed."""
    num_groups = draw(st.integers(1, 5))
    group_sizes = draw(st.lists(st.integers(0, 6), min_size=num_groups, max_size=num_groups))
    tail = draw(st.integers(0, 3))
    k = draw(st.integers(1, 8))
    n = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    return group_sizes, tail, k, n, seed


def _operands(
    group_sizes: list[int], tail: int, k: int, n: int, seed: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    m = sum(group_sizes) + tail
    lhs = rng.standard_normal((m, k)).astype(dtype)
    rhs = rng.standard_normal((len(group_sizes), k, n)).astype(dtype)
    return lhs, rhs, np.asarray(group_sizes, dtype=np.int32)


def _dense_masked_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Every row times every group's matrix, masked to its own group: differentiable, O(g*m*k*n)."""
    group_ends = jnp.cumsum(group_sizes)
    group_starts = group_ends - group_sizes
    rows = jnp.arange(lhs.shape[0])
    member = (rows >= group_starts[:, None]) & (rows < group_ends[:, None])  # [groups, m]
    return jnp.einsum("gm,mk,gkn->mn", member.astype(lhs.dtype), lhs, rhs)


@settings(max_examples=40, deadline=None)
@given(gmm_problems())
def test_gmm_matches_loop_reference_in_float64(problem: tuple) -> None:
    with jax.enable_x64(True):
        lhs, rhs, group_sizes = _operands(*problem, dtype=np.float64)
        out = gmm(lhs, rhs, group_sizes)
        chex.assert_shape(out, (lhs.shape[0], rhs.shape[2]))
        chex.assert_type(out, jnp.float64)
        np.testing.assert_allclose(
            out, gmm_reference(lhs, rhs, group_sizes), rtol=1e-12, atol=1e-12
        )


@settings(max_examples=20, deadline=None)
@given(gmm_problems())
def test_gmm_rows_past_the_groups_are_zero(problem: tuple) -> None:
    lhs, rhs, group_sizes = _operands(*problem, dtype=np.float32)
    out = np.asarray(gmm(lhs, rhs, group_sizes, impl="xla"))
    np.testing.assert_array_equal(out[int(group_sizes.sum()) :], 0.0)


@settings(max_examples=25, deadline=None)
@given(gmm_problems())
def test_gmm_gradients_match_dense_masked_reference(problem: tuple) -> None:
    with jax.enable_x64(True):
        lhs, rhs, group_sizes = _operands(*problem, dtype=np.float64)
        cotangent = np.random.default_rng(problem[-1] + 1).standard_normal(
            (lhs.shape[0], rhs.shape[2])
        )

        def loss(fn, lhs, rhs):
            return jnp.sum(fn(lhs, rhs, group_sizes) * cotangent)

        # jit compiles each backward pass once instead of op by op.
        grads = jax.jit(jax.grad(lambda a, b: loss(gmm, a, b), argnums=(0, 1)))(lhs, rhs)
        expected = jax.jit(jax.grad(lambda a, b: loss(_dense_masked_gmm, a, b), argnums=(0, 1)))(
            lhs, rhs
        )
        for grad, want in zip(grads, expected, strict=True):
            np.testing.assert_allclose(grad, want, rtol=1e-12, atol=1e-12)


def test_gmm_bf16_accumulates_in_float32() -> None:
    lhs, rhs, group_sizes = _operands([70, 0, 50, 8], 4, 256, 16, seed=0, dtype=np.float32)
    lhs, rhs = jnp.asarray(lhs, jnp.bfloat16), jnp.asarray(rhs, jnp.bfloat16)
    wide = gmm(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    chex.assert_type(wide, jnp.float32)
    # Exact products of bf16 values summed in float32: float32 round-off only, over k=256.
    reference = gmm_reference(lhs.astype(jnp.float32), rhs.astype(jnp.float32), group_sizes)
    np.testing.assert_allclose(wide, reference, rtol=1e-5, atol=1e-4)
    narrow = gmm(lhs, rhs, group_sizes)
    chex.assert_type(narrow, jnp.bfloat16)
    # The bf16 output is the float32 accumulation rounded once, not a bf16 running sum.
    np.testing.assert_array_equal(narrow, wide.astype(jnp.bfloat16))


def test_gmm_bf16_gradients_keep_input_dtype() -> None:
    lhs, rhs, group_sizes = _operands([3, 0, 5], 2, 8, 4, seed=1, dtype=np.float32)
    lhs, rhs = jnp.asarray(lhs, jnp.bfloat16), jnp.asarray(rhs, jnp.bfloat16)
    grads = jax.grad(lambda a, b: jnp.sum(gmm(a, b, group_sizes).astype(jnp.float32)), (0, 1))(
        lhs, rhs
    )
    chex.assert_type(grads, jnp.bfloat16)
    chex.assert_shape(grads, (lhs.shape, rhs.shape))


@pytest.mark.parametrize("impl", GMM_IMPLS)
def test_gmm_jits_with_traced_group_sizes(impl: str) -> None:
    lhs, rhs, group_sizes = _operands([2, 0, 5, 1], 3, 6, 5, seed=2, dtype=np.float32)
    out = jax.jit(lambda a, b, g: gmm(a, b, g, impl=impl))(lhs, rhs, group_sizes)
    np.testing.assert_allclose(out, gmm_reference(lhs, rhs, group_sizes), rtol=1e-5, atol=1e-5)


def test_gmm_unknown_impl_names_field_value_and_allowed() -> None:
    lhs, rhs, group_sizes = _operands([2, 2], 0, 3, 3, seed=3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"impl: unknown value 'pallas'; allowed: auto, xla"):
        gmm(lhs, rhs, group_sizes, impl="pallas")


@pytest.mark.parametrize(
    ("lhs_shape", "rhs_shape", "sizes_shape", "dtypes", "match"),
    [
        ((4,), (2, 4, 3), (2,), ("float32", "float32", "int32"), "lhs: expected"),
        ((4, 4), (4, 3), (2,), ("float32", "float32", "int32"), "rhs: expected"),
        ((4, 4), (2, 4, 3), (2, 1), ("float32", "float32", "int32"), "group_sizes: expected"),
        ((4, 5), (2, 4, 3), (2,), ("float32", "float32", "int32"), "rhs: contracting size"),
        ((4, 4), (2, 4, 3), (3,), ("float32", "float32", "int32"), "group_sizes: 3 groups"),
        ((4, 4), (2, 4, 3), (2,), ("int32", "int32", "int32"), "lhs: dtype must be floating"),
        ((4, 4), (2, 4, 3), (2,), ("float32", "bfloat16", "int32"), "rhs: dtype bfloat16"),
        ((4, 4), (2, 4, 3), (2,), ("float32", "float32", "float32"), "group_sizes: dtype"),
    ],
)
def test_gmm_rejects_bad_operands(
    lhs_shape: tuple, rhs_shape: tuple, sizes_shape: tuple, dtypes: tuple, match: str
) -> None:
    lhs_dtype, rhs_dtype, sizes_dtype = dtypes
    with pytest.raises(ValueError, match=match):
        gmm(
            jnp.ones(lhs_shape, lhs_dtype),
            jnp.ones(rhs_shape, rhs_dtype),
            jnp.ones(sizes_shape, sizes_dtype),
        )


def test_gmm_rejects_integer_output_dtype() -> None:
    lhs, rhs, group_sizes = _operands([2, 2], 0, 3, 3, seed=4, dtype=np.float32)
    with pytest.raises(ValueError, match="preferred_element_type: must be floating"):
        gmm(lhs, rhs, group_sizes, preferred_element_type=jnp.int32)
