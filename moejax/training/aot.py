"""Compile the train step for a TPU pod or GPU nodes from a CPU machine: per-device memory,
FLOPs, collectives.

    python -m moejax.training.aot --config configs/default.py --topology v5p:4x4x4 \\
        [--config.mesh.expert=8 ...]   (overrides as for train.py)
    python -m moejax.training.aot --topology h100:8          (one node of 8 H100s)

The step compiled is the real one (`moejax.training.step.make_train_step`): traced under a mesh
of the described devices (`moejax.parallel.aot`), the kernels choose the Pallas implementation
and the tile sizes of that chip.

Exit status: 0 when the step fits the chips' HBM, 1 when it does not (the compiler's report or
the memory table says by how much), 2 for an input error (config, topology, no libtpu or CUDA
plugin).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from moejax import cli
from moejax import config as config_lib
from moejax.config import Config
from moejax.parallel import sharding
from moejax.parallel.aot import (
    GIB,
    CompiledReport,
    DoesNotFit,
    compile_report,
    parse_topology,
    prepare_deviceless_compile,
)
from moejax.training.state import state_layout
from moejax.training.step import make_train_step


def compile_step(config: Config, topology: str) -> CompiledReport:
    """Compiles `config`'s train step for every device of `topology` and reports its needs.

    The config is validated for the topology's device count first (mesh sizes, batch and model
    divisibility: `ConfigError`). See `moejax.parallel.aot.topology_devices` for what the process
    needs. Raises `DoesNotFit` when XLA refuses the program for lack of HBM.
    """
    import jax
    import jax.numpy as jnp

    target = parse_topology(topology)
    sizes = config_lib.validate(config, len(target.devices))
    mesh = sharding.make_mesh(sizes, target.devices)
    layout = state_layout(config, mesh)
    step = make_train_step(layout, mesh)
    tokens = jax.ShapeDtypeStruct(
        (config.data.global_batch_size, config.data.seq_len),
        jnp.int32,
        sharding=sharding.batch_sharding(mesh),
    )
    batch = {"inputs": tokens, "targets": tokens}
    return compile_report(step, (layout.restore_target(), batch), target, topology, sizes)


def main(argv: Sequence[str]) -> int:
    prepare_deviceless_compile()
    return cli.report_user_errors(lambda: _main(argv), argv)


def _main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moejax.training.aot", description=__doc__.splitlines()[0]
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
