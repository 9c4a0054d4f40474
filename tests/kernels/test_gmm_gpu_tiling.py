"""The GPU grouped-matmul tiles fit every chip of the table, are the largest that do, and an
explicit tiling that does not fit is refused by name.

`tests/aot/test_gpu_kernels_compile.py` checks the other half: that `gpu_shared_memory` really
bounds what Triton asks for, by compiling the kernels for H100.
"""

import itertools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

from kernels_pallas import gmm, gpu_chips
from kernels_pallas.grouped_matmul import tiling as tiling_lib

CHIPS = (*gpu_chips.GPU_CHIPS.values(), gpu_chips.FALLBACK_CHIP)
DTYPES = (jnp.float32, jnp.bfloat16)
# (rows m, d_model k, expert_d_ff n, experts): the default config's expert layer on one device
# of 8 (4 experts, 32 x 128 tokens, top-2), moe_1b's (32 fine-grained experts) and an odd one.
SHAPES = ((1024, 128, 256, 4), (131072, 2048, 256, 32), (1000, 384, 640, 4), (64, 16, 16, 64))


def _kernels(tilings: tiling_lib.KernelTilings, m: int, k: int, n: int):
    """(kernel, tiles, the problem side each tile spans, the axes of the output block)."""
    return (
        ("gmm", tilings.forward, (m, k, n), (0, 2)),
        ("gmm", tilings.lhs_grad, (m, n, k), (0, 2)),
        ("tgmm", tilings.rhs_grad, (m, k, n), (1, 2)),
    )


def _covers(tile: int, side: int, cap: int) -> bool:
    """Whether `tile` already spans `side` (rounded up to a power of two >= 16) or `cap`."""
    return tile >= min(cap, max(16, 1 << (side - 1).bit_length()))


def _doubled(tiles, axis):
    return tuple(t * 2 if i == axis else t for i, t in enumerate(tiles))


@pytest.mark.parametrize(("chip", "dtype", "shape"), list(itertools.product(CHIPS, DTYPES, SHAPES)))
def test_default_gpu_tiles_fit_the_chip_and_are_the_largest_that_do(chip, dtype, shape):
    m, k, n, groups = shape
    tilings = tiling_lib.default_tilings(m, k, n, groups, "gpu", dtype, chip)
    for kernel, tiles, sides, output_axes in _kernels(tilings, m, k, n):
        tiling_lib.check_gpu_fit(kernel, tiles, dtype, chip)
        assert all(t >= 16 and t & (t - 1) == 0 for t in tiles), tiles
        # The contracted axis (columns for gmm, rows for tgmm) is sized by shared memory:
        # doubling it overflows the chip unless it already spans its side or the cap.
        contracted = 1 if kernel == "gmm" else 0
        if not _covers(tiles[contracted], sides[contracted], tiling_lib.GPU_MAX_CONTRACTING_TILE):
            need = tiling_lib.gpu_shared_memory(kernel, _doubled(tiles, contracted), dtype)
            assert need > chip.shared_memory_per_block, (kernel, tiles)
        # The output block is sized by the accumulator's registers: doubling a side of it
        # overflows them unless that side is already whole (gmm's rows follow group sizes).
        for axis in output_axes[1:] if kernel == "gmm" else output_axes:
            grown = tiling_lib.gpu_accumulator_elements(kernel, _doubled(tiles, axis))
            if grown <= tiling_lib.GPU_ACCUMULATOR_ELEMENTS:
                assert _covers(tiles[axis], sides[axis], 1 << 30), (kernel, tiles, axis)


def test_float32_gets_half_the_contracting_tile_of_bfloat16_on_h100():
    h100 = gpu_chips.GPU_CHIPS["h100"]
    wide = tiling_lib.default_tilings(131072, 2048, 2048, 32, "gpu", jnp.bfloat16, h100)
    narrow = tiling_lib.default_tilings(131072, 2048, 2048, 32, "gpu", jnp.float32, h100)
    assert narrow.forward[1] * 2 == wide.forward[1]
    assert narrow.rhs_grad[0] * 2 == wide.rhs_grad[0]


def test_the_shared_memory_bound_counts_staged_operand_tiles():
    # gmm holds lhs [64, 32] and rhs [32, 128]; tgmm lhs [64, 32] and dout [64, 128].
    assert tiling_lib.gpu_shared_memory("gmm", (64, 32, 128), jnp.float32) == 3 * 6144 * 4
    assert tiling_lib.gpu_shared_memory("tgmm", (64, 32, 128), jnp.bfloat16) == 3 * 10240 * 2


def test_chip_of_kind_reads_the_driver_names():
    assert gpu_chips.chip_of_kind("NVIDIA H100 80GB HBM3").name == "h100"
    assert gpu_chips.chip_of_kind("NVIDIA H200").name == "h200"
    assert gpu_chips.chip_of_kind("NVIDIA A100-SXM4-40GB").name == "a100"
    assert gpu_chips.chip_of_kind("NVIDIA GeForce RTX 4090") is gpu_chips.FALLBACK_CHIP


def test_target_chip_follows_the_mesh_being_traced_for():
    device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)
    with use_abstract_mesh(mesh):
        assert gpu_chips.target_chip().name == "h100"
    assert gpu_chips.target_chip() is gpu_chips.FALLBACK_CHIP  # CPU: the kernels interpreted


@pytest.mark.parametrize(
    ("device_kind", "backend"), [("NVIDIA A100-SXM4-80GB", None), ("NVIDIA H100 80GB HBM3", "gpu")]
)
def test_an_explicit_triton_tiling_that_overflows_shared_memory_is_refused_by_name(
    device_kind, backend
):
    """The Triton kernels: the A100's by default, Hopper's when asked for by name."""
    device = AbstractDevice(device_kind=device_kind, num_cores=108, platform="gpu")
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)
    lhs = jax.ShapeDtypeStruct((4096, 1024), jnp.float32)
    rhs = jax.ShapeDtypeStruct((4, 1024, 1024), jnp.float32)
    sizes = jax.ShapeDtypeStruct((4,), jnp.int32)
    tiled = lambda a, b, s: gmm(a, b, s, impl="pallas", tiling=(128, 128, 128), backend=backend)
    with use_abstract_mesh(mesh), pytest.raises(ValueError, match=r"tiling: gmm tiles \(128, 128"):
        jax.eval_shape(tiled, lhs, rhs, sizes)
