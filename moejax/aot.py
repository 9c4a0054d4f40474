"""Compile the train step for a TPU pod or GPU nodes from a CPU machine: per-device memory,
FLOPs, collectives.

    python -m moejax.aot --config configs/default.py --topology v5p:4x4x4 \\
        [--config.mesh.expert=8 ...]   (overrides as for train.py)
    python -m moejax.aot --topology h100:8          (one node of 8 H100s)

XLA compiles for a description of the devices without any attached, so whether a config fits a
v5p-64 or an H100 node and what it communicates is known before renting one. The step compiled
is the real one (`moejax.training.step.make_train_step`): traced under a mesh of the described
devices, the kernels choose the Pallas implementation and the tile sizes of that chip.

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

Exit status: 0 when the step fits the chips' HBM, 1 when it does not (the compiler's report or
the memory table says by how much), 2 for an input error (config, topology, no libtpu or CUDA
plugin).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import re
import sys
from collections.abc import Sequence

from kernels_pallas import gpu_chips
from moejax import cli, hlo
from moejax import config as config_lib
from moejax.config import Config
from moejax.errors import UserError

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
    collectives: from the step's HLO, bytes as `moejax.hlo` defines them.
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
        """The report as printed by `python -m moejax.aot`."""
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


def compile_step(config: Config, topology: str) -> CompiledReport:
    """Compiles `config`'s train step for every device of `topology` and reports its needs.

    The config is validated for the topology's device count first (mesh sizes, batch and model
    divisibility: `ConfigError`). See `topology_devices` for what the process needs. Raises
    `DoesNotFit` when XLA refuses the program for lack of HBM.
    """
    import jax
    import jax.numpy as jnp

    from moejax import sharding
    from moejax.training.state import state_layout
    from moejax.training.step import make_train_step

    target = parse_topology(topology)
    devices = target.devices
    sizes = config_lib.validate(config, len(devices))
    mesh = sharding.make_mesh(sizes, devices)
    layout = state_layout(config, mesh)
    step = make_train_step(layout, mesh)
    tokens = jax.ShapeDtypeStruct(
        (config.data.global_batch_size, config.data.seq_len),
        jnp.int32,
        sharding=sharding.batch_sharding(mesh),
    )
    hbm_bytes = target.hbm_bytes
    try:
        compiled = step.compile(layout.restore_target(), {"inputs": tokens, "targets": tokens})
    except jax.errors.JaxRuntimeError as error:
        # A kernel asking for more shared memory than the chip has is a bug in its tiles, not a
        # model too large for the devices.
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
        mesh=sizes,
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


def main(argv: Sequence[str]) -> int:
    # Before jax starts any backend: compile on CPU for devices that are only descriptions.
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
    return cli.report_user_errors(lambda: _main(argv), argv)


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moejax.aot", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", default=cli.DEFAULT_CONFIG, help="a Python config file")
    parser.add_argument(
        "--topology", required=True, help="TPU or GPU devices, e.g. v5p:4x4x4, h100:8, h100:2x8"
    )
    cli.add_debug_flag(parser)
    args, overrides = cli.parse(parser, argv)
    config = config_lib.apply_overrides(config_lib.load_config_file(args.config), overrides)
    try:
        report = compile_step(config, args.topology)
    except DoesNotFit as error:
        print(f"does not fit: {error}", file=sys.stderr)
        return 1
    print(report.format())
    if not report.fits:
        print(
            f"does not fit: {report.memory.total / GIB:.2f} GiB per device needed, "
            f"{report.hbm_bytes / GIB:.2f} GiB of HBM on each {report.chip} device",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
