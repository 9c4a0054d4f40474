"""Our TPU Pallas (Mosaic) kernels compile for v5e, v5p and v6e chips, forward and backward.

Compiled ahead of time for one-chip topologies on this CPU machine (libtpu): Mosaic lowers each
kernel for the chip's generation, so a block shape or layout that one generation's vector units
or VMEM refuse fails here, not on a rented pod. Shapes are the TPU-sized ones of
benchmarks/kernels.py (its bfloat16 accelerator rows).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("libtpu", reason="compiling for a TPU topology needs libtpu ([tpu] extra)")

from kernels_pallas import block_sparse_attention, gmm  # noqa: E402
from moejax.parallel import aot, sharding  # noqa: E402

TOPOLOGIES = ("v5e:1x1", "v5p:1x1x1", "v6e:1x1")
GMM_M, GMM_K, GMM_N = 16384, 4096, 4096
LENGTH, HEADS, HEAD_DIM, BLOCK, DENSITY = 8192, 16, 128, 128, 0.25


@pytest.fixture(scope="module", params=TOPOLOGIES)
def chip_mesh(request):
    """A one-device mesh of the topology: kernels traced under it target that TPU."""
    devices = aot.topology_devices(request.param)
    assert len(devices) == 1
    return sharding.make_mesh(dict.fromkeys(sharding.MESH_AXES, 1), devices)


def _kernel_calls(fn, mesh, *shapes) -> list[str]:
    """The names of the Mosaic custom calls in `fn` compiled for the mesh's TPU."""
    with jax.set_mesh(mesh):
        text = jax.jit(fn).lower(*shapes).compile().as_text()
    return [
        line.split("=", 1)[0].strip().removeprefix("ROOT ").lstrip("%")
        for line in text.splitlines()
        if 'custom_call_target="tpu_custom_call"' in line
    ]


def _gmm_operands(groups: int):
    """lhs [m, k], rhs [groups, k, n] bfloat16, group_sizes [groups] int32."""
    return (
        jax.ShapeDtypeStruct((GMM_M, GMM_K), jnp.bfloat16),
        jax.ShapeDtypeStruct((groups, GMM_K, GMM_N), jnp.bfloat16),
        jax.ShapeDtypeStruct((groups,), jnp.int32),
    )


@pytest.mark.parametrize("groups", [8, 64])
def test_gmm_forward_compiles_to_the_mosaic_kernel(chip_mesh, groups):
    calls = _kernel_calls(
        lambda lhs, rhs, sizes: gmm(lhs, rhs, sizes, impl="pallas"),
        chip_mesh,
        *_gmm_operands(groups),
    )
    assert [name.rsplit(".", 1)[0] for name in calls] == ["moejax_gmm"]


@pytest.mark.parametrize("groups", [8, 64])
def test_gmm_backward_compiles_to_the_gmm_and_tgmm_kernels(chip_mesh, groups):
    def loss(lhs, rhs, sizes):
        return jnp.sum(gmm(lhs, rhs, sizes, impl="pallas").astype(jnp.float32))

    calls = _kernel_calls(jax.grad(loss, argnums=(0, 1)), chip_mesh, *_gmm_operands(groups))
    # d lhs = d out @ rhs^T is a gmm, d rhs = lhs^T @ d out per group is the tgmm kernel; the
    # forward product is dead (the sum's gradient does not need it).
    assert sorted(re.search(r"moejax_t?gmm", name).group() for name in calls) == [
        "moejax_gmm",
        "moejax_tgmm",
    ]


def test_gmm_auto_picks_the_mosaic_kernel_under_a_tpu_mesh(chip_mesh):
    calls = _kernel_calls(
        lambda lhs, rhs, sizes: gmm(lhs, rhs, sizes, impl="auto"), chip_mesh, *_gmm_operands(8)
    )
    assert len(calls) == 1


def _attention(q, k, v):
    """q, k, v: [1, LENGTH, HEADS, HEAD_DIM]; every query block visits a quarter of the kv
    blocks, its own included (the benchmark's random mask)."""
    blocks = LENGTH // BLOCK
    rng = np.random.default_rng(1)
    mask = np.eye(blocks, dtype=bool)
    for row in range(blocks):
        others = rng.permutation(np.delete(np.arange(blocks), row))
        mask[row, others[: round(DENSITY * blocks) - 1]] = True
    return block_sparse_attention(
        q, k, v, mask[None, None], block_q=BLOCK, block_kv=BLOCK, impl="pallas"
    )


def _attention_operands():
    return (jax.ShapeDtypeStruct((1, LENGTH, HEADS, HEAD_DIM), jnp.bfloat16),) * 3


def test_block_sparse_attention_forward_compiles_to_one_mosaic_kernel(chip_mesh):
    assert len(_kernel_calls(_attention, chip_mesh, *_attention_operands())) == 1


def test_block_sparse_attention_backward_compiles_to_mosaic_kernels(chip_mesh):
    def loss(q, k, v):
        return jnp.sum(_attention(q, k, v).astype(jnp.float32))

    calls = _kernel_calls(jax.grad(loss, argnums=(0, 1, 2)), chip_mesh, *_attention_operands())
    # The forward kernel (its log-sum-exp is a residual), then the dq and the dk/dv kernels.
    assert len(calls) == 3
