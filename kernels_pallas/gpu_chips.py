"""The NVIDIA GPUs the kernels are sized for: one table of the limits that decide tile sizes.

A Pallas kernel that asks for more shared memory per block than the chip has does not compile
(`RESOURCE_EXHAUSTED: Shared memory size limit exceeded`), and the compiler does not shrink the
tiles for us. The kernels therefore read the chip they are traced for (`target_chip`: the device
kind of the ambient mesh, else of the default device) and size their tiles to its limits.

The same table describes the chips to XLA when compiling for a GPU node without a GPU
(`moejax.parallel.aot`, `target_config`): the numbers are the vendor's published ones, as the CUDA
driver
reports them (`cudaDeviceProp`), not copied from any compiler's files.

A GPU the table does not know gets `FALLBACK_CHIP`'s limits, the smallest shared memory of the
data-centre chips Triton and Mosaic GPU serve, so tiles still fit; they may be smaller than
that chip allows.
"""

import dataclasses

import jax

from kernels_pallas.platform import target_platform


@dataclasses.dataclass(frozen=True)
class GpuChip:
    """One GPU model.

    name: moejax's short name ("h100"), as `--topology h100:8` spells it.
    device_kind: `jax.Device.device_kind` of the chip, as the CUDA driver names it.
    compute_capability: (major, minor); Hopper is (9, 0), Ampere (8, 0).
    sm_count: streaming multiprocessors.
    shared_memory_per_block: bytes of shared memory one block may opt in to
        (`sharedMemPerBlockOptin`): the limit a kernel's tiles must fit.
    shared_memory_per_sm: bytes of shared memory per multiprocessor.
    registers_per_block: 32-bit registers one block may use.
    memory_bytes: device memory (HBM) as the driver reports it.
    memory_bandwidth: bytes per second of HBM bandwidth.
    clock_ghz: boost clock of the multiprocessors.
    l2_cache_bytes: size of the L2 cache.
    """

    name: str
    device_kind: str
    compute_capability: tuple[int, int]
    sm_count: int
    shared_memory_per_block: int
    shared_memory_per_sm: int
    registers_per_block: int
    memory_bytes: int
    memory_bandwidth: float
    clock_ghz: float
    l2_cache_bytes: int

    @property
    def has_wgmma(self) -> bool:
        """Hopper's warpgroup matmuls and TMA: what Mosaic GPU kernels are written for."""
        return self.compute_capability[0] >= 9

    def target_config(self) -> str:
        """This chip as XLA's `GpuTargetConfigProto` in text format: what
        `jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)`
        compiles for when no GPU is attached."""
        major, minor = self.compute_capability
        return "\n".join(
            [
                "gpu_device_info {",
                f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
                "  threads_per_block_limit: 1024",
                "  threads_per_warp: 32",
                "  shared_memory_per_block: 49152",
                f"  shared_memory_per_block_optin: {self.shared_memory_per_block}",
                f"  shared_memory_per_core: {self.shared_memory_per_sm}",
                "  threads_per_core_limit: 2048",
                f"  core_count: {self.sm_count}",
                "  fpus_per_core: 128",
                "  block_dim_limit_x: 2147483647",
                "  block_dim_limit_y: 65535",
                "  block_dim_limit_z: 65535",
                f"  memory_bandwidth: {int(self.memory_bandwidth)}",
                f"  l2_cache_size: {self.l2_cache_bytes}",
                f"  clock_rate_ghz: {self.clock_ghz}",
                f"  device_memory_size: {self.memory_bytes}",
                "  registers_per_core_limit: 65536",
                f"  registers_per_block_limit: {self.registers_per_block}",
                "}",
                'platform_name: "CUDA"',
                "dnn_version_info { major: 9 minor: 8 }",
                f'device_description_str: "{self.device_kind}"',
                "",
            ]
        )


MIB = 1024**2

# The shared-memory opt-in of Hopper is 227 KiB, of A100 163 KiB (both less the 1 KiB the
# driver reserves per block, which `sharedMemPerBlockOptin` already excludes).
GPU_CHIPS = {
    chip.name: chip
    for chip in (
        GpuChip(
            name="h100",
            device_kind="NVIDIA H100 80GB HBM3",
            compute_capability=(9, 0),
            sm_count=132,
            shared_memory_per_block=232448,
            shared_memory_per_sm=233472,
            registers_per_block=65536,
            memory_bytes=81559 * MIB,
            memory_bandwidth=3.35e12,
            clock_ghz=1.98,
            l2_cache_bytes=50 * MIB,
        ),
        GpuChip(
            name="h200",
            device_kind="NVIDIA H200",
            compute_capability=(9, 0),
            sm_count=132,
            shared_memory_per_block=232448,
            shared_memory_per_sm=233472,
            registers_per_block=65536,
            memory_bytes=143771 * MIB,
            memory_bandwidth=4.8e12,
            clock_ghz=1.98,
            l2_cache_bytes=50 * MIB,
        ),
        GpuChip(
            name="a100",
            device_kind="NVIDIA A100-SXM4-80GB",
            compute_capability=(8, 0),
            sm_count=108,
            shared_memory_per_block=166912,
            shared_memory_per_sm=167936,
            registers_per_block=65536,
            memory_bytes=81920 * MIB,
            memory_bandwidth=2.039e12,
            clock_ghz=1.41,
            l2_cache_bytes=40 * MIB,
        ),
    )
}

# Any other GPU: consumer Ampere and Ada parts opt in to 99 KiB per block, the least of the
# chips the Pallas GPU backends serve.
FALLBACK_CHIP = dataclasses.replace(
    GPU_CHIPS["a100"],
    name="unknown",
    device_kind="unknown GPU",
    compute_capability=(8, 6),
    shared_memory_per_block=101376,
    shared_memory_per_sm=102400,
)


def chip_of_kind(device_kind: str) -> GpuChip:
    """The table's chip whose name appears in `device_kind` ("NVIDIA H100 80GB HBM3" is the
    h100), else `FALLBACK_CHIP`."""
    kind = device_kind.lower()
    for chip in GPU_CHIPS.values():
        if chip.name in kind:
            return chip
    return FALLBACK_CHIP


def target_chip() -> GpuChip:
    """The GPU the code being traced will run on: the device kind of the ambient mesh's devices
    (a mesh of GPU descriptions when compiling ahead of time), else of the default device.
    `FALLBACK_CHIP` when that is not a GPU (the GPU kernels interpreted on CPU)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        device = mesh.abstract_device
        return chip_of_kind(device.device_kind) if device.platform == "gpu" else FALLBACK_CHIP
    if target_platform() != "gpu":
        return FALLBACK_CHIP
    return chip_of_kind(jax.devices()[0].device_kind)
