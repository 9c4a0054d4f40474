"""Our Pallas kernels against JAX's megablox gmm/tgmm, an independent implementation.

Both run interpreted on CPU in float32. megablox wants every dimension a multiple of its tile and
leaves rows past the groups unwritten, so the shapes here are whole tiles and only the rows of the
groups are compared.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kernels_pallas.grouped_matmul import gpu, tpu

# The package's `gmm` name is its custom_vjp wrapper; the kernels module holds both kernels.
megablox = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")

KERNELS = {"tpu": tpu, "gpu": gpu}
ROWS, K, N, NUM_GROUPS = 32, 16, 16, 5
NUM_LOCAL = 3  # one static shape per backend: each compiles once
TILING = (8, 8, 8)


@st.composite
def group_problems(draw: st.DrawFn) -> tuple[list[int], int, int, int]:
    """NUM_GROUPS sizes (zeros allowed) summing to at most ROWS, a local range and a seed."""
    sizes = draw(
        st.lists(st.integers(0, 8), min_size=NUM_GROUPS, max_size=NUM_GROUPS).filter(
            lambda sizes: sum(sizes) <= ROWS  # megablox reads past the rows otherwise
        )
    )
    group_offset = draw(st.integers(0, NUM_GROUPS - NUM_LOCAL))
    return sizes, group_offset, NUM_LOCAL, draw(st.integers(0, 2**31 - 1))


@functools.partial(jax.jit, static_argnames=("backend", "num_local"))
def _ours_and_megablox(lhs, rhs, dout, group_sizes, group_offset, *, backend, num_local):
    kernels = KERNELS[backend]
    common = dict(tiling=TILING, out_dtype=jnp.float32, interpret=True)
    ours = (
        kernels.gmm(lhs, rhs, group_sizes, group_offset, transpose_rhs=False, **common),
        kernels.tgmm(lhs, dout, group_sizes, group_offset, num_local, **common),
    )
    theirs = (
        megablox.gmm(
            lhs,
            rhs,
            group_sizes,
            jnp.float32,
            TILING,
            group_offset=group_offset,
            interpret=True,
        ),
        megablox.tgmm(
            lhs.T,
            dout,
            group_sizes,
            jnp.float32,
            TILING,
            group_offset=group_offset,
            num_actual_groups=num_local,
            interpret=True,
        ),
    )
    return ours, theirs


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@settings(max_examples=6, deadline=None)
@given(group_problems())
@example(([0, 12, 0, 20, 0], 1, NUM_LOCAL, 0))  # an empty group between full ones, no tail
@example(([1, 8, 8, 7, 8], 2, NUM_LOCAL, 0))  # groups ending exactly at the last row
def test_kernels_match_megablox_gmm_and_tgmm(backend: str, problem: tuple) -> None:
    sizes, group_offset, num_local, seed = problem
    rng = np.random.default_rng(seed)
    lhs = rng.standard_normal((ROWS, K)).astype(np.float32)
    rhs = rng.standard_normal((num_local, K, N)).astype(np.float32)
    dout = rng.standard_normal((ROWS, N)).astype(np.float32)
    group_sizes = np.asarray(sizes, np.int32)
    (out, drhs), (want_out, want_drhs) = _ours_and_megablox(
        lhs,
        rhs,
        dout,
        group_sizes,
        np.int32(group_offset),
        backend=backend,
        num_local=num_local,
    )
    rows = slice(int(np.sum(sizes[:group_offset])), int(np.sum(sizes[: group_offset + num_local])))
    np.testing.assert_allclose(out[rows], want_out[rows], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(drhs, want_drhs, rtol=1e-5, atol=1e-5)
