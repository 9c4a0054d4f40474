"""On a GPU, gmm's "auto" is our grouped-matmul kernel, never `ragged_dot` (which XLA computes
as a dense matmul over every group there), and asking for "xla" says what it costs, once."""

import re
import warnings

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

from kernels_pallas import gmm
from kernels_pallas.grouped_matmul import resolve_impl

TRITON_CALL = "__gpu$xla.gpu.triton"
MOSAIC_GPU_CALL = "mosaic_gpu_v2"
RAGGED_DOT_OP = re.compile(r"\b(chlo|stablehlo)\.ragged_dot")
H100 = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
GPU_MESH = AbstractMesh((1,), ("x",), (AxisType.Auto,), abstract_device=H100)
GROUPS = 8
OPERANDS = (
    jax.ShapeDtypeStruct((512, 128), jnp.bfloat16),
    jax.ShapeDtypeStruct((GROUPS, 128, 256), jnp.bfloat16),
    jax.ShapeDtypeStruct((GROUPS,), jnp.int32),
)


def _gpu_module(impl: str) -> str:
    """The StableHLO of gmm(impl) exported for CUDA from this CPU machine."""
    with use_abstract_mesh(GPU_MESH):
        exported = export.export(
            jax.jit(lambda lhs, rhs, sizes: gmm(lhs, rhs, sizes, impl=impl)),
            platforms=["cuda"],
            disabled_checks=[
                export.DisabledSafetyCheck.custom_call(call)
                for call in (TRITON_CALL, MOSAIC_GPU_CALL)
            ],
        )(*OPERANDS)
    return exported.mlir_module()


def test_auto_is_the_pallas_kernel_on_gpu_and_xla_tiled_on_cpu():
    with use_abstract_mesh(GPU_MESH):
        assert resolve_impl("auto") == "pallas"
    assert resolve_impl("auto") == "xla_tiled"


def test_auto_on_hopper_is_the_mosaic_gpu_kernel_without_ragged_dot():
    module = _gpu_module("auto")
    assert f"stablehlo.custom_call @{MOSAIC_GPU_CALL}" in module
    assert TRITON_CALL not in module
    assert not RAGGED_DOT_OP.search(module)


def test_xla_on_gpu_warns_once_with_the_flop_multiple():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = _gpu_module("xla")
        _gpu_module("xla")
    assert RAGGED_DOT_OP.search(first)
    messages = [str(w.message) for w in caught if "gmm impl 'xla' on GPU" in str(w.message)]
    assert len(messages) == 1, messages
    assert f"all {GROUPS} groups, {GROUPS}x the FLOPs" in messages[0]


def test_xla_on_cpu_does_not_warn():
    lhs = jnp.ones((16, 8), jnp.float32)
    rhs = jnp.ones((2, 8, 4), jnp.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = gmm(lhs, rhs, jnp.array([10, 6], jnp.int32), impl="xla")
    assert out.shape == (16, 4)


@pytest.fixture(autouse=True)
def _fresh_warning_state(monkeypatch):
    from kernels_pallas.grouped_matmul import ops

    monkeypatch.setattr(ops, "_warned_group_counts", set())
