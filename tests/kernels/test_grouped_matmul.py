"""kernels_pallas.gmm's XLA paths and its argument checks, against a float64 loop reference.

The Pallas kernels have their own files: test_gmm_pallas*.py.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import GMM_IMPLS, gmm
from kernels_pallas.grouped_matmul import (
    gmm_dense_reference,
    gmm_reference,
    resolve_impl,
    xla_tiled,
)

# "pallas" compiles for a TPU or GPU; on CPU it is a ValueError (tested below).
CPU_IMPLS = tuple(impl for impl in GMM_IMPLS if impl != "pallas")


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


@st.composite
def tiled_gmm_problems(draw: st.DrawFn) -> tuple[tuple[list[int], int, int, int, int], int | None]:
    """A problem with groups large enough to span tiles of several sizes, and a tile_m.

    Tiles of 1 to 3 rows force many tiles per group; None takes the default rule.
    """
    num_groups = draw(st.integers(1, 5))
    group_sizes = draw(st.lists(st.integers(0, 40), min_size=num_groups, max_size=num_groups))
    tail = draw(st.integers(0, 9))
    k = draw(st.integers(1, 8))
    n = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    tile_m = draw(st.one_of(st.none(), st.integers(1, 3), st.integers(4, 48)))
    return (group_sizes, tail, k, n, seed), tile_m


# Jitted: each drawn shape compiles one program, not its operations one by one.
_jit_gmm = jax.jit(gmm, static_argnames=("impl", "tile_m"))


def _operands(
    group_sizes: list[int], tail: int, k: int, n: int, seed: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    m = sum(group_sizes) + tail
    lhs = rng.standard_normal((m, k)).astype(dtype)
    rhs = rng.standard_normal((len(group_sizes), k, n)).astype(dtype)
    return lhs, rhs, np.asarray(group_sizes, dtype=np.int32)


@settings(max_examples=20, deadline=None)
@given(gmm_problems())
def test_ragged_dot_matches_loop_reference_in_float64(problem: tuple) -> None:
    with jax.enable_x64(True):
        lhs, rhs, group_sizes = _operands(*problem, dtype=np.float64)
        out = _jit_gmm(lhs, rhs, group_sizes, impl="xla")
        chex.assert_shape(out, (lhs.shape[0], rhs.shape[2]))
        chex.assert_type(out, jnp.float64)
        np.testing.assert_allclose(
            out, gmm_reference(lhs, rhs, group_sizes), rtol=1e-12, atol=1e-12
        )


@settings(max_examples=25, deadline=None)
@given(tiled_gmm_problems())
def test_xla_tiled_matches_loop_reference_in_float64(tiled_problem: tuple) -> None:
    problem, tile_m = tiled_problem
    with jax.enable_x64(True):
        lhs, rhs, group_sizes = _operands(*problem, dtype=np.float64)
        out = _jit_gmm(lhs, rhs, group_sizes, impl="xla_tiled", tile_m=tile_m)
        chex.assert_shape(out, (lhs.shape[0], rhs.shape[2]))
        chex.assert_type(out, jnp.float64)
        np.testing.assert_allclose(
            out, gmm_reference(lhs, rhs, group_sizes), rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize("impl", ["xla", "xla_tiled"])
@settings(max_examples=10, deadline=None)
@given(gmm_problems())
def test_gmm_rows_past_the_groups_are_zero(impl: str, problem: tuple) -> None:
    lhs, rhs, group_sizes = _operands(*problem, dtype=np.float32)
    out = np.asarray(_jit_gmm(lhs, rhs, group_sizes, impl=impl))
    np.testing.assert_array_equal(out[int(group_sizes.sum()) :], 0.0)


@settings(max_examples=12, deadline=None)
@given(gmm_problems())
def test_ragged_dot_gradients_match_dense_masked_reference(problem: tuple) -> None:
    with jax.enable_x64(True):
        lhs, rhs, group_sizes = _operands(*problem, dtype=np.float64)
        cotangent = np.random.default_rng(problem[-1] + 1).standard_normal(
            (lhs.shape[0], rhs.shape[2])
        )

        def loss(fn, lhs, rhs):
            return jnp.sum(fn(lhs, rhs, group_sizes) * cotangent)

        def ragged_dot(lhs, rhs, group_sizes):
            return gmm(lhs, rhs, group_sizes, impl="xla")

        # jit compiles each backward pass once instead of op by op.
        grads = jax.jit(jax.grad(lambda a, b: loss(ragged_dot, a, b), argnums=(0, 1)))(lhs, rhs)
        expected = jax.jit(jax.grad(lambda a, b: loss(gmm_dense_reference, a, b), argnums=(0, 1)))(
            lhs, rhs
        )
        for grad, want in zip(grads, expected, strict=True):
            np.testing.assert_allclose(grad, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(tiled_gmm_problems())
def test_xla_tiled_gradients_match_dense_masked_reference(tiled_problem: tuple) -> None:
    problem, tile_m = tiled_problem
    with jax.enable_x64(True):
        lhs, rhs, group_sizes = _operands(*problem, dtype=np.float64)
        cotangent = np.random.default_rng(problem[-1] + 1).standard_normal(
            (lhs.shape[0], rhs.shape[2])
        )

        def loss(fn, lhs, rhs):
            return jnp.sum(fn(lhs, rhs, group_sizes) * cotangent)

        def tiled(lhs, rhs, group_sizes):
            return gmm(lhs, rhs, group_sizes, impl="xla_tiled", tile_m=tile_m)

        grads = jax.jit(jax.grad(lambda a, b: loss(tiled, a, b), argnums=(0, 1)))(lhs, rhs)
        expected = jax.jit(jax.grad(lambda a, b: loss(gmm_dense_reference, a, b), argnums=(0, 1)))(
            lhs, rhs
        )
        for grad, want in zip(grads, expected, strict=True):
            np.testing.assert_allclose(grad, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["xla", "xla_tiled"])
def test_gmm_bf16_accumulates_in_float32(impl: str) -> None:
    lhs, rhs, group_sizes = _operands([70, 0, 50, 8], 4, 256, 16, seed=0, dtype=np.float32)
    lhs, rhs = jnp.asarray(lhs, jnp.bfloat16), jnp.asarray(rhs, jnp.bfloat16)
    wide = gmm(lhs, rhs, group_sizes, impl=impl, preferred_element_type=jnp.float32)
    chex.assert_type(wide, jnp.float32)
    # Exact products of bf16 values summed in float32: float32 round-off only, over k=256.
    reference = gmm_reference(lhs.astype(jnp.float32), rhs.astype(jnp.float32), group_sizes)
    np.testing.assert_allclose(wide, reference, rtol=1e-5, atol=1e-4)
    narrow = gmm(lhs, rhs, group_sizes, impl=impl)
    chex.assert_type(narrow, jnp.bfloat16)
    # The bf16 output is the float32 accumulation rounded once, not a bf16 running sum.
    np.testing.assert_array_equal(narrow, wide.astype(jnp.bfloat16))


@pytest.mark.parametrize("impl", ["xla", "xla_tiled"])
def test_gmm_bf16_gradients_keep_input_dtype_and_match_float32(impl: str) -> None:
    lhs, rhs, group_sizes = _operands([30, 0, 21], 2, 8, 4, seed=1, dtype=np.float32)
    lhs, rhs = jnp.asarray(lhs, jnp.bfloat16), jnp.asarray(rhs, jnp.bfloat16)

    cotangent = np.random.default_rng(2).standard_normal((lhs.shape[0], rhs.shape[2]))

    def loss(lhs, rhs):
        out = gmm(lhs, rhs, group_sizes, impl=impl, preferred_element_type=jnp.float32)
        return jnp.sum(out * cotangent.astype(np.float32))

    grads = jax.grad(loss, (0, 1))(lhs, rhs)
    chex.assert_type(grads, jnp.bfloat16)
    chex.assert_shape(grads, (lhs.shape, rhs.shape))
    # bf16 rounding of the cotangent and of the result, on top of float32 sums.
    expected = jax.grad(loss, (0, 1))(lhs.astype(jnp.float32), rhs.astype(jnp.float32))
    for grad, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(grad.astype(jnp.float32), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_gmm_jits_with_traced_group_sizes_and_offset(impl: str) -> None:
    lhs, rhs, group_sizes = _operands([2, 0, 5, 1], 3, 6, 5, seed=2, dtype=np.float32)
    out = jax.jit(lambda a, b, g: gmm(a, b, g, impl=impl))(lhs, rhs, group_sizes)
    np.testing.assert_allclose(out, gmm_reference(lhs, rhs, group_sizes), rtol=1e-5, atol=1e-5)
    local = jax.jit(lambda a, b, g, o: gmm(a, b, g, impl=impl, group_offset=o))(
        lhs, rhs[1:3], group_sizes, np.int32(1)
    )
    np.testing.assert_allclose(
        local, gmm_reference(lhs, rhs[1:3], group_sizes, 1), rtol=1e-5, atol=1e-5
    )


@st.composite
def local_problems(draw: st.DrawFn) -> tuple[list[int], int, int]:
    """Five group sizes (zeros allowed) within 30 rows, an offset for 3 local groups, a seed."""
    group_sizes = draw(st.lists(st.integers(0, 6), min_size=5, max_size=5))
    return group_sizes, draw(st.integers(0, 2)), draw(st.integers(0, 2**31 - 1))


@functools.partial(jax.jit, static_argnames="impl")
def _local_output_and_grads(lhs, rhs, cotangent, group_sizes, group_offset, impl):
    def loss(lhs, rhs):
        out = gmm(lhs, rhs, group_sizes, impl=impl, group_offset=group_offset)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(lhs, rhs)
    return out, grads


@pytest.mark.parametrize("impl", ["xla", "xla_tiled"])
@settings(max_examples=10, deadline=None)
@given(local_problems())
def test_xla_paths_with_group_offset_match_reference_and_its_gradients(
    impl: str, problem: tuple
) -> None:
    group_sizes, offset, seed = problem
    with jax.enable_x64(True):
        # Fixed shapes (30 rows, 3 of 5 groups local) with traced sizes and offset: one compile.
        lhs, rhs, sizes = _operands(group_sizes, 30 - sum(group_sizes), 3, 4, seed, np.float64)
        rhs = rhs[:3]
        cotangent = np.random.default_rng(seed + 1).standard_normal((30, 4))
        out, grads = _local_output_and_grads(lhs, rhs, cotangent, sizes, np.int32(offset), impl)
        np.testing.assert_allclose(
            out, gmm_reference(lhs, rhs, sizes, offset), rtol=1e-12, atol=1e-12
        )
        expected = jax.grad(
            lambda a, b: jnp.sum(gmm_dense_reference(a, b, sizes, offset) * cotangent), (0, 1)
        )(lhs, rhs)
        for grad, want in zip(grads, expected, strict=True):
            np.testing.assert_allclose(grad, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("group_sizes", [[0, 0, 0], []], ids=["empty-groups", "no-groups"])
@pytest.mark.parametrize("tail", [0, 3])
def test_xla_tiled_handles_no_rows_in_any_group(group_sizes: list[int], tail: int) -> None:
    lhs, rhs, group_sizes = _operands(group_sizes, tail, 4, 3, seed=6, dtype=np.float32)
    out, grads = jax.value_and_grad(
        lambda a, b: jnp.sum(gmm(a, b, group_sizes, impl="xla_tiled")), argnums=(0, 1)
    )(lhs, rhs)
    np.testing.assert_array_equal(out, 0.0)
    chex.assert_trees_all_equal(grads, (np.zeros_like(lhs), np.zeros_like(rhs)))


def test_gmm_auto_is_xla_tiled_on_cpu() -> None:
    assert jax.default_backend() == "cpu"
    assert resolve_impl("auto") == "xla_tiled"
    lhs, rhs, group_sizes = _operands([2, 0, 5], 1, 3, 2, seed=5, dtype=np.float32)
    jaxpr = str(jax.make_jaxpr(lambda a, b, g: gmm(a, b, g, impl="auto"))(lhs, rhs, group_sizes))
    assert "ragged_dot" not in jaxpr
    assert "while" in jaxpr


@pytest.mark.parametrize(
    ("m", "num_groups", "tile_m"),
    [
        (8192, 4, 2048),
        (8192, 8, 1024),
        (32768, 64, 512),
        (1000, 10, 64),
        (10, 3, 8),
        (2**20, 4, 2048),
    ],
)
def test_default_tile_m_is_a_power_of_two_near_the_mean_group(
    m: int, num_groups: int, tile_m: int
) -> None:
    assert xla_tiled.default_tile_m(m, num_groups) == tile_m


@pytest.mark.parametrize(
    ("tile_m", "m", "sizes"),
    [
        (512, 10000, (512, 128, 32, 8)),
        (256, 10000, (256, 64, 16, 8)),
        (64, 40, (16, 8)),
        (12, 100, (12, 8)),
        (16, 5, (5,)),
        (3, 9, (3,)),
    ],
)
def test_tile_sizes_shrink_to_the_minimum_and_fit_in_m(
    tile_m: int, m: int, sizes: tuple[int, ...]
) -> None:
    assert xla_tiled.tile_sizes(tile_m, m) == sizes


def test_gmm_unknown_impl_names_field_value_and_allowed() -> None:
    lhs, rhs, group_sizes = _operands([2, 2], 0, 3, 3, seed=3, dtype=np.float32)
    with pytest.raises(
        ValueError,
        match=r"impl: unknown value 'cuda'; allowed: auto, pallas, interpret, xla, xla_tiled$",
    ):
        gmm(lhs, rhs, group_sizes, impl="cuda")


def test_gmm_pallas_on_cpu_is_a_value_error_pointing_at_interpret() -> None:
    lhs, rhs, group_sizes = _operands([2, 2], 0, 3, 3, seed=3, dtype=np.float32)
    with pytest.raises(
        ValueError, match=r"impl: 'pallas' .* default backend is 'cpu'.*'interpret'"
    ):
        gmm(lhs, rhs, group_sizes, impl="pallas")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(impl="interpret", backend="cuda"), r"backend: unknown value 'cuda'; allowed: tpu"),
        (dict(impl="xla", backend="tpu"), r"backend, interpret_params: only used by impl"),
        (dict(impl="interpret", interpret_params=True), r"interpret_params: got True"),
        (
            dict(impl="interpret", backend="gpu", interpret_params=pltpu.InterpretParams()),
            r"interpret_params: the TPU interpreter's settings; got backend 'gpu'",
        ),
        (dict(impl="interpret", tiling=(8, 8)), r"tiling: got \(8, 8\); allowed: None or"),
        (dict(impl="interpret", tiling=(8, 0, 8)), r"tiling: got \(8, 0, 8\)"),
        (dict(impl="interpret", tiling=(8, 12, 8)), r"gpu kernel's tiles must be powers of two"),
        (dict(group_offset=2), r"group_offset: got 2; allowed: 0 to 1 for 2 local groups out of 3"),
        (dict(group_offset=-1), r"group_offset: got -1; allowed: 0 to 1"),
        (dict(group_offset=np.ones(2, np.int32)), r"group_offset: expected an integer scalar"),
        (dict(group_offset=0.5), r"group_offset: expected an integer scalar"),
    ],
)
def test_gmm_rejects_bad_kernel_arguments(kwargs: dict, match: str) -> None:
    lhs, rhs, group_sizes = _operands([2, 2, 1], 0, 3, 3, seed=3, dtype=np.float32)
    if "group_offset" in kwargs:
        rhs = rhs[:2]
    with pytest.raises(ValueError, match=match):
        gmm(lhs, rhs, group_sizes, **kwargs)


@pytest.mark.parametrize("tile_m", [0, -8, 2.5, True])
def test_gmm_rejects_bad_tile_m(tile_m: object) -> None:
    lhs, rhs, group_sizes = _operands([2, 2], 0, 3, 3, seed=3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"tile_m: got .*; allowed: None or a positive int"):
        gmm(lhs, rhs, group_sizes, impl="xla_tiled", tile_m=tile_m)


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
