"""The compiled kernels lower for TPU (Mosaic) and GPU (Triton) from a CPU-only machine.

`jax.export` lowers a function for a platform that is not present. For the Pallas kernels that
runs our kernel bodies through the Mosaic and Triton lowerings (every op must have a rule there;
Triton also insists on power-of-two array sides), without compiling the result for a device:
what only a device checks (Mosaic's layouts, Triton's code generation) stays for the
`accelerator`-marked test.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

from kernels_pallas import gpu_chips
from kernels_pallas.grouped_matmul import default_tilings, ops_pallas

TRITON_CALL = "__gpu$xla.gpu.triton"
# The Triton lowering reads the target GPU's compute capability from the device in scope.
H100 = AbstractDevice(device_kind="NVIDIA H100", num_cores=132, platform="gpu")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize(("backend", "platform"), [("tpu", "tpu"), ("gpu", "cuda")])
def test_forward_and_backward_kernels_lower_for_the_device(
    backend: str, platform: str, dtype: jnp.dtype
) -> None:
    m, k, n, num_local = 1000, 384, 640, 4  # m and n not multiples of the default tiles
    tilings = default_tilings(m, k, n, num_local, backend, dtype, gpu_chips.GPU_CHIPS["h100"])
    config = ops_pallas.KernelConfig(backend, tilings, jnp.dtype(dtype), interpret=False)

    def loss(lhs, rhs, group_sizes, group_offset):
        out = ops_pallas.gmm_pallas(lhs, rhs, group_sizes, group_offset, config)
        return jnp.sum(out.astype(jnp.float32))

    grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))  # the value keeps the forward
    args = (
        jax.ShapeDtypeStruct((m, k), dtype),
        jax.ShapeDtypeStruct((num_local, k, n), dtype),
        jax.ShapeDtypeStruct((8,), jnp.int32),  # 8 groups in all, 4 of them local
        jax.ShapeDtypeStruct((), jnp.int32),
    )
    if backend == "tpu":
        exported = export.export(grads, platforms=[platform])(*args)
        kernel_call = "tpu_custom_call"
    else:
        mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=H100)
        with use_abstract_mesh(mesh):
            exported = export.export(
                grads,
                platforms=[platform],
                disabled_checks=[export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
            )(*args)
        kernel_call = TRITON_CALL
    module = exported.mlir_module()
    # gmm forward, gmm against rhs transposed (lhs's gradient) and tgmm (rhs's gradient).
    assert module.count(f"stablehlo.custom_call @{kernel_call}") == 3
    assert module.count("moejax_gmm") >= 2 and "moejax_tgmm" in module
