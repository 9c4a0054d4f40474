"""Our GPU Pallas kernels compile for an NVIDIA H100, forward and backward, in float32 and
bfloat16, at the shapes the configs use; and the shared memory they ask for stays under the bound
their tiles were chosen by.

Compiled ahead of time on this CPU machine with jax's CUDA plugin
(`moejax.parallel.aot.parse_topology`,
no GPU): Triton generates the kernels for sm_90 and ptxas assembles them, so a tile too large for
the chip's shared memory fails here, not on a rented node.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("jax_plugins.xla_cuda12", reason="GPU compiles need the [cuda-aot] extra")

from jax.experimental import topologies  # noqa: E402

from kernels_pallas import block_sparse_attention, gmm, gpu_chips  # noqa: E402
from kernels_pallas.block_sparse_attention import gpu as attention_gpu  # noqa: E402
from kernels_pallas.block_sparse_attention.spec import AttentionSpec  # noqa: E402
from kernels_pallas.grouped_matmul import gpu as gmm_gpu  # noqa: E402
from kernels_pallas.grouped_matmul import tiling as tiling_lib  # noqa: E402
from moejax.parallel import aot, sharding  # noqa: E402

TRITON_CALL = 'custom_call_target="__gpu$xla.gpu.triton"'
MOSAIC_GPU_CALL = 'custom_call_target="mosaic_gpu_v2"'
DTYPES = (jnp.float32, jnp.bfloat16)
# (rows, d_model, expert_d_ff, experts) of one device's expert layer: the default config (4
# experts, 4 x 128 tokens x top-2 on each of 8 devices) and moe_1b's fine-grained 32 experts (one
# sequence of 2048 tokens x top-2 per device).
GMM_SHAPES = {"default": (1024, 128, 256, 4), "moe_1b": (4096, 2048, 256, 32)}


def _mesh(chip: gpu_chips.GpuChip):
    description = topologies.get_topology_desc(
        platform="cuda", target_config=chip.target_config(), topology="1x1x1"
    )
    return sharding.make_mesh(dict.fromkeys(sharding.MESH_AXES, 1), list(description.devices))


@pytest.fixture(scope="module")
def h100_mesh():
    devices = aot.topology_devices("h100:1")
    assert devices[0].device_kind == "NVIDIA H100 80GB HBM3"
    return sharding.make_mesh(dict.fromkeys(sharding.MESH_AXES, 1), devices)


def _kernel_names(fn, mesh, *shapes, target: str = TRITON_CALL) -> list[str]:
    """The names (`moejax_...`) of the kernels (custom calls of `target`) in `fn` compiled for
    the mesh's GPU."""
    with jax.set_mesh(mesh):
        text = jax.jit(fn).lower(*shapes).compile().as_text()
    return sorted(
        re.search(r"moejax_\w+|pallas_call", line.split('op_name="', 1)[1]).group()
        for line in text.splitlines()
        if target in line
    )


def _gmm_operands(shape, dtype):
    m, k, n, groups = shape
    return (
        jax.ShapeDtypeStruct((m, k), dtype),
        jax.ShapeDtypeStruct((groups, k, n), dtype),
        jax.ShapeDtypeStruct((groups,), jnp.int32),
    )


def _gmm_value_and_grads(lhs, rhs, sizes):
    loss = lambda a, b: jnp.sum(gmm(a, b, sizes, impl="auto").astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1))(lhs, rhs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GMM_SHAPES)
def test_gmm_on_hopper_compiles_to_the_mosaic_gpu_kernels_only(h100_mesh, shape, dtype):
    operands = _gmm_operands(GMM_SHAPES[shape], dtype)
    names = _kernel_names(_gmm_value_and_grads, h100_mesh, *operands, target=MOSAIC_GPU_CALL)
    # The forward, the lhs gradient (gmm against rhs transposed) and the rhs gradient (tgmm).
    assert names == ["moejax_gmm_mosaic", "moejax_gmm_mosaic", "moejax_tgmm_mosaic"]
    assert _kernel_names(_gmm_value_and_grads, h100_mesh, *operands) == []  # no Triton call


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GMM_SHAPES)
def test_gmm_on_a100_compiles_to_the_triton_kernels_that_fit_it(shape, dtype):
    """Mosaic GPU does not serve the A100 (no WGMMA): the Triton kernels, sized to its 163 KiB
    of shared memory per block."""
    mesh = _mesh(gpu_chips.GPU_CHIPS["a100"])
    names = _kernel_names(_gmm_value_and_grads, mesh, *_gmm_operands(GMM_SHAPES[shape], dtype))
    assert names == ["moejax_gmm", "moejax_gmm", "moejax_tgmm"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_shared_memory_bound_holds_for_the_compiler(dtype):
    """Each kernel compiles for a chip whose shared memory is exactly the bound of its tiles:
    the compiler never asks for more than `gpu_shared_memory` says."""
    m, k, n, groups = GMM_SHAPES["moe_1b"]
    h100 = gpu_chips.GPU_CHIPS["h100"]
    tilings = tiling_lib.default_tilings(m, k, n, groups, "gpu", dtype, h100)
    zero = jnp.zeros((), jnp.int32)
    kernels = {
        "gmm": (
            lambda a, b, s: gmm_gpu.gmm(
                a,
                b,
                s,
                zero,
                tiling=tilings.forward,
                transpose_rhs=False,
                out_dtype=dtype,
                interpret=False,
            ),
            ((m, k), (groups, k, n)),
            tilings.forward,
        ),
        "gmm_transposed": (
            lambda a, b, s: gmm_gpu.gmm(
                a,
                b,
                s,
                zero,
                tiling=tilings.lhs_grad,
                transpose_rhs=True,
                out_dtype=dtype,
                interpret=False,
            ),
            ((m, n), (groups, k, n)),
            tilings.lhs_grad,
        ),
        "tgmm": (
            lambda a, b, s: gmm_gpu.tgmm(
                a, b, s, zero, groups, tiling=tilings.rhs_grad, out_dtype=dtype, interpret=False
            ),
            ((m, k), (m, n)),
            tilings.rhs_grad,
        ),
    }
    for name, (fn, (lhs, rhs), tiles) in kernels.items():
        bound = tiling_lib.gpu_shared_memory(name.split("_")[0], tiles, dtype)
        chip = dataclasses.replace(h100, shared_memory_per_block=bound)
        operands = (
            jax.ShapeDtypeStruct(lhs, dtype),
            jax.ShapeDtypeStruct(rhs, dtype),
            jax.ShapeDtypeStruct((groups,), jnp.int32),
        )
        assert _kernel_names(fn, _mesh(chip), *operands), name


# (block, head_dim): the attention configs' default block_size of 64 at the default model's
# head_dim of 32, and blocks of 128 at moe_1b's head_dim of 128 (the benchmark's shape).
ATTENTION_SHAPES = [(64, 32), (128, 128)]
LENGTH, HEADS = 1024, 4


def _attention(q, k, v, block):
    """Causal attention over the diagonal block and the three before it."""
    blocks = LENGTH // block
    mask = np.tril(np.ones((blocks, blocks), bool)) & ~np.tri(blocks, k=-4, dtype=bool)
    return block_sparse_attention(
        q, k, v, mask[None, None], block_q=block, block_kv=block, causal=True, impl="auto"
    )


def _attention_grads(block):
    def value_and_grads(q, k, v):
        loss = lambda *qkv: jnp.sum(_attention(*qkv, block).astype(jnp.float32))
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    return value_and_grads


def _attention_operands(head_dim, dtype):
    return (jax.ShapeDtypeStruct((1, LENGTH, HEADS, head_dim), dtype),) * 3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("block", "head_dim"), ATTENTION_SHAPES)
def test_block_sparse_attention_forward_and_backward_compile(h100_mesh, block, head_dim, dtype):
    if dtype == jnp.float32 and block == 128:
        # Two float32 blocks of 128 x 128 per loop step and two held: no chip has the room.
        with pytest.raises(ValueError, match="block_q, block_kv: blocks of 128 x 128 at head_dim"):
            _kernel_names(_attention_grads(block), h100_mesh, *_attention_operands(head_dim, dtype))
        return
    names = _kernel_names(_attention_grads(block), h100_mesh, *_attention_operands(head_dim, dtype))
    # The forward kernel (its log-sum-exp is a residual), then the dq and the dk/dv kernels.
    assert len(names) == 3, names


@pytest.mark.parametrize(
    ("block", "head_dim", "dtype"), [(128, 64, jnp.float32), (128, 128, jnp.bfloat16)]
)
def test_attention_shared_memory_bound_holds_for_the_compiler(block, head_dim, dtype):
    """The three kernels compile for a chip whose shared memory is exactly the bound at the
    stages chosen for H100 (one, for these blocks): the compiler never asks for more."""
    spec = AttentionSpec(
        q_len=LENGTH, kv_len=LENGTH, block_q=block, block_kv=block, scale=1.0, causal=True
    )
    h100 = gpu_chips.GPU_CHIPS["h100"]
    stages = attention_gpu.num_stages(spec, head_dim, dtype, h100)
    assert stages == 1
    bound = attention_gpu.shared_memory_bound(spec, head_dim, dtype, stages)
    chip = dataclasses.replace(h100, shared_memory_per_block=bound)
    names = _kernel_names(
        _attention_grads(block), _mesh(chip), *_attention_operands(head_dim, dtype)
    )
    assert len(names) == 3, names
