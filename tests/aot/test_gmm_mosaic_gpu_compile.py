"""The Mosaic GPU grouped-matmul kernels compile for an NVIDIA H100, gmm in both orientations and
tgmm, in bfloat16 and float32, at the shapes the configs use; and the shared memory they ask for
is what their pipeline depth was chosen by.

Compiled ahead of time on this CPU machine with jax's CUDA plugin (`moejax.parallel.aot`, no GPU):
Mosaic
GPU lowers each kernel for sm_90a here, so an operand layout WGMMA does not take ("Only f16
WGMMA supports transposes") or a kernel over the chip's shared memory fails here, not on a
rented node.
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("jax_plugins.xla_cuda12", reason="GPU compiles need the [cuda-aot] extra")

# A test hook of Mosaic GPU: lowering fails, naming what it asks, past this many bytes.
from jax.experimental.mosaic.gpu.core import artificial_shared_memory_limit  # noqa: E402

from kernels_pallas import gpu_chips  # noqa: E402
from kernels_pallas.grouped_matmul import mosaic_gpu  # noqa: E402
from kernels_pallas.grouped_matmul import tiling as tiling_lib  # noqa: E402
from moejax.parallel import aot, sharding  # noqa: E402

MOSAIC_GPU_CALL = 'custom_call_target="mosaic_gpu_v2"'
TRITON_CALL = 'custom_call_target="__gpu$xla.gpu.triton"'
DTYPES = (jnp.bfloat16, jnp.float32)
# (rows, d_model, expert_d_ff, experts) of one device's expert layer: the default config and
# moe_1b's fine-grained 32 experts, as in test_gpu_kernels_compile.py.
GMM_SHAPES = {"default": (1024, 128, 256, 4), "moe_1b": (4096, 2048, 256, 32)}
KERNELS = ("gmm", "gmm_transposed", "tgmm")


@pytest.fixture(scope="module")
def h100_mesh():
    devices = aot.topology_devices("h100:1")
    assert devices[0].device_kind == "NVIDIA H100 80GB HBM3"
    return sharding.make_mesh(dict.fromkeys(sharding.MESH_AXES, 1), devices)


def _kernel_call(kernel: str, shape: tuple[int, int, int, int], dtype):
    """The kernel as the forward (gmm), the lhs gradient (gmm_transposed) or the rhs gradient
    (tgmm) of `[m, k] x [g, k, n]` runs it, with the default GPU tilings, and its operands."""
    m, k, n, groups = shape
    tilings = tiling_lib.default_tilings(m, k, n, groups, "gpu", dtype, gpu_chips.GPU_CHIPS["h100"])
    zero = jnp.zeros((), jnp.int32)
    sizes = jax.ShapeDtypeStruct((groups,), jnp.int32)
    weights = jax.ShapeDtypeStruct((groups, k, n), dtype)
    if kernel == "tgmm":
        fn = functools.partial(
            mosaic_gpu.tgmm,
            group_offset=zero,
            num_groups=groups,
            tiling=tilings.rhs_grad,
            out_dtype=dtype,
            interpret=False,
        )
        rows = jax.ShapeDtypeStruct((m, k), dtype)
        return fn, (rows, jax.ShapeDtypeStruct((m, n), dtype), sizes)
    transpose_rhs = kernel == "gmm_transposed"
    fn = functools.partial(
        mosaic_gpu.gmm,
        group_offset=zero,
        tiling=tilings.lhs_grad if transpose_rhs else tilings.forward,
        transpose_rhs=transpose_rhs,
        out_dtype=dtype,
        interpret=False,
    )
    rows = jax.ShapeDtypeStruct((m, n if transpose_rhs else k), dtype)
    return fn, (rows, weights, sizes)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("shape", GMM_SHAPES)
def test_kernel_compiles_to_one_mosaic_gpu_call(h100_mesh, shape, dtype, kernel):
    fn, operands = _kernel_call(kernel, GMM_SHAPES[shape], dtype)
    with jax.set_mesh(h100_mesh):
        text = jax.jit(fn).lower(*operands).compile().as_text()
    calls = [line for line in text.splitlines() if MOSAIC_GPU_CALL in line]
    name = "moejax_tgmm_mosaic" if kernel == "tgmm" else "moejax_gmm_mosaic"
    assert len(calls) == 1 and name in calls[0]
    assert TRITON_CALL not in text


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_shared_memory_is_the_pipeline_the_stages_were_chosen_for(
    h100_mesh, monkeypatch, dtype, kernel
):
    """At moe_1b's shapes every pipeline runs at least `MAX_STAGES` steps, so the compiler
    asks for exactly `shared_memory_bytes` of the chosen depth, barriers aside, under H100's
    limit."""
    plans = []

    def recorded(stage_bytes: int, out_bytes: int, what: str) -> int:
        stages = pipeline_stages(stage_bytes, out_bytes, what)
        plans.append((stages, stage_bytes, out_bytes))
        return stages

    pipeline_stages = mosaic_gpu.pipeline_stages
    monkeypatch.setattr(mosaic_gpu, "pipeline_stages", recorded)
    fn, operands = _kernel_call(kernel, GMM_SHAPES["moe_1b"], dtype)
    with (
        jax.set_mesh(h100_mesh),
        artificial_shared_memory_limit(0),
        pytest.raises(ValueError, match="exceeds available shared memory") as error,
    ):
        jax.jit(fn).lower(*operands).compile()
    asked = int(re.search(r"smem_bytes=(\d+)", str(error.value)).group(1))
    [(stages, stage_bytes, out_bytes)] = plans
    planned = mosaic_gpu.shared_memory_bytes(stages, stage_bytes, out_bytes)
    assert stages == mosaic_gpu.MAX_STAGES
    assert planned <= asked <= planned + mosaic_gpu.SHARED_MEMORY_RESERVE
    assert asked <= gpu_chips.GPU_CHIPS["h100"].shared_memory_per_block
