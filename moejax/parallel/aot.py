"""Devices that are only descriptions: TPU and GPU topologies compiled for from a CPU machine,
and what a compiled program needs there (memory per device, FLOPs, collectives).

XLA compiles for a description of the devices without any attached, so whether a program fits a
v5p-64 or an H100 node and what it communicates is known before renting one. The train step's
command line is `python -m moejax.training.aot` (`moejax.training.aot`).

TPU topologies are libtpu's names, `<chip>:<chips per axis>`: "v5p:2x2x2", "v5p:4x4x4"
(v5p-64), "v5p:4x8x8" (v5p-256), "v5e:2x2", "v6e:1x1", "v4:2x2x1". They need libtpu (the `[tpu]`
extra).

GPU topologies are `<gpu>:<gpus per node>` or `<gpu>:<nodes>x<gpus per node>`: "h100:8" (one
node), "h100:2x8" (two nodes, 16 GPUs), "h200:8", "a100:8". They need the CUDA plugin of the
installed jax (the `[cuda-aot]` extra: no GPU, no driver). XLA is told the chip by a
`GpuTargetConfigProto` made from moejax's own table (`kernels_pallas.gpu_chips`) rather than
read from the plugin's embedded files: the table is what the kernels size their tiles by, so
the compiler checks the very limits the tiles were chosen for, and it names the chips by the
names users type. `cost_analysis()` is empty for GPU programs, so the FLOP line reads 0.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

from kernels_pallas import gpu_chips
from moejax.errors import UserError
from moejax.parallel import hlo

GIB = 1024**3

# High-bandwidth memory per chip. Where libtpu describes a chip as several devices (v4's two
# TensorCores without megacore), each device gets its share.
HBM_BYTES_PER_CHIP = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}

_TOPOLOGY = re.compile(r"^(?P<chip>[a-z0-9]+):(?P<dims>\d+(?:x\d+){1,2})$")
_GPU_TOPOLOGY = re.compile(r"^(?P<chip>[a-z0-9]+):(?:(?P<nodes>\d+)x)?(?P<gpus>\d+)$")


class TopologyError(UserError):
    label = "topology error"


class DoesNotFit(Exception):
    """The step needs more memory per chip than the chip has; the message says how much."""


@dataclasses.dataclass(frozen=True)
class MemoryUse:
    """Bytes per device of the compiled step (`compiled.memory_analysis()`).

    arguments: the state and batch shards; outputs: the new state and metrics; aliased: output
    bytes that reuse donated argument buffers; temporaries: activations, gradients and scratch;
    generated_code: the program itself.
    """

    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    generated_code: int

    @property
    def total(self) -> int:
        """Bytes live at the peak: arguments, outputs not aliased onto them, temporaries, code."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code


@dataclasses.dataclass(frozen=True)
class CompiledReport:
    """What the compiled step needs per device of the topology.

    platform: "tpu" or "gpu".
    flops: `compiled.cost_analysis()["flops"]` for one step on one device; it counts XLA's own
    operations, and Pallas kernels only as far as they declare a cost estimate (ours do not: the
    expert and block-sparse attention matmuls are missing from it). 0 on GPU, where XLA gives
    no cost analysis.
    collectives: from the step's HLO, bytes as `moejax.parallel.hlo` defines them.
    """

    topology: str
    chip: str
    platform: str
    device_kind: str
    num_devices: int
    mesh: dict[str, int]
    memory: MemoryUse
    hbm_bytes: int
    flops: float
    collectives: list[hlo.Collective]
    hlo_text: str = dataclasses.field(repr=False)

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.hbm_bytes

    def format(self) -> str:
        """The report as printed by `python -m moejax.parallel.aot`."""
        mesh = " ".join(f"{axis}={size}" for axis, size in self.mesh.items())
        memory = self.memory
        rows = [
            ("arguments", memory.arguments),
            ("outputs", memory.outputs),
            ("aliased (donated)", -memory.aliased),
            ("temporaries", memory.temporaries),
            ("generated code", memory.generated_code),
        ]
        lines = [
            f"{self.topology}: {self.num_devices} devices ({self.device_kind}), mesh {mesh}",
            "memory per device (GiB):",
            *(f"  {name:<18} {value / GIB:9.3f}" for name, value in rows),
            f"  {'total':<18} {memory.total / GIB:9.3f} of {self.hbm_bytes / GIB:.2f} HBM "
            f"({100 * memory.total / self.hbm_bytes:.1f}%)",
            (
                f"flops per step per device: {self.flops:.4g} (XLA ops; Pallas kernels not counted)"
                if self.platform == "tpu"
                else "flops per step per device: not available (no cost analysis for GPU programs)"
            ),
            "collectives per step per device (bytes of their results):",
            f"  {'kind':<20} {'ops':>6} {'MiB':>12}",
        ]
        counts = dict.fromkeys(hlo.KINDS, 0)
        for collective in self.collectives:
            counts[collective.kind] += collective.executions
        for kind, total in hlo.bytes_by_kind(self.collectives).items():
            lines.append(f"  {kind:<20} {counts[kind]:>6} {total / 2**20:>12.3f}")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Topology:
    """A parsed `--topology`: the devices XLA compiles for and the memory each has.

    name: as given ("v5p:2x2x2", "h100:2x8"); chip: its chip ("v5p", "h100"); platform: "tpu"
    or "gpu"; devices: the device descriptions; hbm_bytes: memory of one device.
    """

    name: str
    chip: str
    platform: str
    devices: list
    hbm_bytes: int


def parse_topology(topology: str) -> Topology:
    """The devices of a TPU topology such as "v5p:4x4x4" (64 chips) or GPU nodes such as
    "h100:8" (8 GPUs) or "h100:2x8" (2 nodes of 8), and the memory of each device.

    Needs jax running on CPU (`jax_platforms="cpu"`, set before jax starts its backends), and
    for TPU libtpu with `TPU_SKIP_MDS_QUERY=1` in the environment (libtpu must not look for the
    cloud machine it would run on), for GPU the CUDA plugin; `main` sets the environment.
    Raises `TopologyError` naming the allowed topologies.
    """
    chip = topology.split(":", 1)[0]
    if chip in gpu_chips.GPU_CHIPS:
        return _gpu_topology(topology)
    match = _TOPOLOGY.match(topology)
    if match is None or match["chip"] not in HBM_BYTES_PER_CHIP:
        raise TopologyError(
            f"--topology {topology!r}: allowed are <tpu>:<chips per axis> with tpu one of "
            f"{', '.join(HBM_BYTES_PER_CHIP)} (e.g. v5p:2x2x2, v5p:4x4x4, v5e:2x2, v6e:1x1), or "
            f"<gpu>:<gpus per node> or <gpu>:<nodes>x<gpus per node> with gpu one of "
            f"{', '.join(gpu_chips.GPU_CHIPS)} (e.g. h100:8, h100:2x8)"
        )
    if importlib.util.find_spec("libtpu") is None:
        raise TopologyError(
            "compiling for a TPU topology needs libtpu: pip install -e '.[tpu]' "
            "(scripts/setup.sh installs it)"
        )
    import jax
    from jax.experimental import topologies

    try:
        devices = list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
    except jax.errors.JaxRuntimeError as error:
        reason = str(error).splitlines()[0]
        raise TopologyError(f"--topology {topology!r}: libtpu refuses it: {reason}") from None
    chips = math.prod(int(size) for size in match["dims"].split("x"))
    hbm_bytes = HBM_BYTES_PER_CHIP[match["chip"]] * chips // len(devices)
    return Topology(topology, match["chip"], "tpu", devices, hbm_bytes)


def _gpu_topology(topology: str) -> Topology:
    match = _GPU_TOPOLOGY.match(topology)
    if match is None or int(match["gpus"]) < 1 or int(match["nodes"] or 1) < 1:
        raise TopologyError(
            f"--topology {topology!r}: a GPU topology is <gpu>:<gpus per node> or "
            f"<gpu>:<nodes>x<gpus per node>, each at least 1, e.g. h100:8, h100:2x8"
        )
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is None and (
        importlib.util.find_spec("jax_plugins.xla_cuda13") is None
    ):
        raise TopologyError(
            "compiling for GPUs needs jax's CUDA plugin: pip install -e '.[cuda-aot]' "
            "(scripts/setup.sh installs it)"
        )
    # The plugin otherwise refuses to load without the CUDA libraries of a GPU machine; only
    # its compiler is used here.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    import jax
    from jax.experimental import topologies

    chip = gpu_chips.GPU_CHIPS[match["chip"]]
    nodes, gpus = int(match["nodes"] or 1), int(match["gpus"])
    try:
        description = topologies.get_topology_desc(
            platform="cuda", target_config=chip.target_config(), topology=f"1x{nodes}x{gpus}"
        )
    except jax.errors.JaxRuntimeError as error:
        reason = str(error).splitlines()[0]
        raise TopologyError(f"--topology {topology!r}: XLA refuses it: {reason}") from None
    return Topology(topology, chip.name, "gpu", list(description.devices), chip.memory_bytes)


def topology_devices(topology: str) -> list:
    """The device descriptions of `topology` (see `parse_topology`)."""
    return parse_topology(topology).devices


def compile_report(
    step, args: tuple, target: Topology, topology: str, mesh_sizes: dict[str, int]
) -> CompiledReport:
    """Compiles the jitted `step` on `args` (abstract arrays sharded over `target`'s devices)
    and reports its memory per device, FLOPs and collectives.

    Raises `DoesNotFit` when XLA refuses the program for lack of HBM; a kernel asking for more
    shared memory than the chip has re-raises XLA's error (a bug in its tiles, not a model too
    large for the devices).
    """
    import jax

    devices = target.devices
    hbm_bytes = target.hbm_bytes
    try:
        compiled = step.compile(*args)
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error) or "Shared memory" in str(error):
            raise
        raise DoesNotFit(
            f"{topology}: the step does not fit in {hbm_bytes / GIB:.2f} GiB of HBM per "
            f"device; XLA says: {_first_lines(str(error), 6)}"
        ) from None
    stats = compiled.memory_analysis()
    memory = MemoryUse(
        arguments=stats.argument_size_in_bytes,
        outputs=stats.output_size_in_bytes,
        aliased=stats.alias_size_in_bytes,
        temporaries=stats.temp_size_in_bytes,
        generated_code=stats.generated_code_size_in_bytes,
    )
    text = compiled.as_text()
    return CompiledReport(
        topology=topology,
        chip=target.chip,
        platform=target.platform,
        device_kind=devices[0].device_kind,
        num_devices=len(devices),
        mesh=mesh_sizes,
        memory=memory,
        hbm_bytes=hbm_bytes,
        flops=float(_cost(compiled).get("flops", 0.0)),
        collectives=hlo.collectives(text),
        hlo_text=text,
    )


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    # Older jax returned one dict per device program; GPU programs have no analysis (None).
    return (cost[0] if isinstance(cost, list) else cost) or {}


def _first_lines(text: str, count: int) -> str:
    return "\n".join(text.strip().splitlines()[:count])


def prepare_deviceless_compile() -> None:
    """Process settings for compiling on CPU for devices that are only descriptions; call before
    jax starts any backend."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # libtpu's lock file guards real chips; several compiles may run at once on one machine.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # Quiets libtpu's start-up complaint that it cannot find the workers of a real slice.
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # The CUDA plugin loads without a GPU's libraries: only its compiler is used.
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    import jax

    jax.config.update("jax_platforms", "cpu")
    # An executable compiled without a TPU client cannot be read back from the persistent cache.
    jax.config.update("jax_enable_compilation_cache", False)
