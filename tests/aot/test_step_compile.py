"""The default model's train step compiles for a v5p-8 (v5p:2x2x2) on five meshes, with the
communication each mesh calls for.

Compiled ahead of time on this CPU machine with libtpu (`moejax.training.aot.compile_step`), Pallas
kernels included: a step that only XLA:CPU can partition, or one that silently gathers every
expert onto every chip, fails here instead of on a pod. Each configuration compiles once per
session, and one test reads its report.
"""

import itertools
import math
import pathlib

import jax
import pytest

pytest.importorskip("libtpu", reason="compiling for a TPU topology needs libtpu ([tpu] extra)")

from moejax import config as config_lib  # noqa: E402
from moejax.config import Config  # noqa: E402
from moejax.parallel import aot, hlo, sharding  # noqa: E402
from moejax.training.aot import compile_step  # noqa: E402
from moejax.training.state import model_spec  # noqa: E402

TOPOLOGY = "v5p:2x2x2"
DEFAULT_CONFIG = pathlib.Path(__file__).parents[2] / "configs" / "default.py"

# name -> overrides of configs/default.py (as on the command line, without "--config.").
# Experts split over mesh.expert are expert parallelism, named by the dispatch strategy.
EXPERT_PARALLEL = "model.moe.dispatch.name=expert_parallel"
# The default mesh compiles the whole default model; the others keep 1 of its 4 identical
# blocks, which has every kind of communication at about half the compile time.
ONE_BLOCK = "model.num_layers=1"
STEPS = {
    "data8": ("mesh.data=8",),
    "data2_expert4": ("mesh.data=2", "mesh.expert=4", EXPERT_PARALLEL, ONE_BLOCK),
    "fsdp2_expert4": ("mesh.data=1", "mesh.fsdp=2", "mesh.expert=4", EXPERT_PARALLEL, ONE_BLOCK),
    "moba_data8": ("mesh.data=8", "attention.kind=moba", ONE_BLOCK),
    "data2_expert2_tensor2": (
        "mesh.data=2",
        "mesh.expert=2",
        "mesh.tensor=2",
        EXPERT_PARALLEL,
        ONE_BLOCK,
    ),
}
EXPERT_SHARDED = ("data2_expert4", "fsdp2_expert4", "data2_expert2_tensor2")


def _config(name: str) -> Config:
    default = config_lib.load_config_file(str(DEFAULT_CONFIG))
    return config_lib.apply_overrides(default, STEPS[name])


@pytest.fixture(scope="session")
def compiled_step():
    """`compiled_step(name) -> CompiledReport`, compiling each configuration of `STEPS` once;
    a compile that raised raises again for every test that asks for it."""
    reports: dict[str, aot.CompiledReport | Exception] = {}

    def get(name: str) -> aot.CompiledReport:
        if name not in reports:
            try:
                reports[name] = compile_step(_config(name), TOPOLOGY)
            except Exception as error:
                reports[name] = error
        if isinstance(reports[name], Exception):
            raise reports[name]
        return reports[name]

    return get


def _expert_weight_gathers(name: str, report: aot.CompiledReport) -> list[hlo.Collective]:
    """All-gathers whose result holds the weights of more experts than one expert shard has.

    For every parameter with an "expert" axis ([num_experts, d_model, expert_d_ff], ...), the
    shapes such a gather produces: the expert axis at 2, 3, ... expert shards' worth of experts,
    every other axis whole or still sharded as the rules table shards it, axes in any order.
    """
    config = _config(name)
    spec = model_spec(config.model, config.attention)
    is_axes = lambda x: isinstance(x, tuple)  # noqa: E731
    expert_shards = report.mesh["expert"]
    forbidden = set()
    for names, struct in zip(
        jax.tree.leaves(spec.logical_axes, is_leaf=is_axes),
        jax.tree.leaves(spec.abstract_params),
        strict=True,
    ):
        if "expert" not in names:
            continue
        choices = []
        for axis_name, size in zip(names, struct.shape, strict=True):
            if axis_name == "expert":
                per_shard = size // expert_shards
                choices.append([per_shard * count for count in range(2, expert_shards + 1)])
            else:
                mesh_axes = sharding.logical_to_mesh((axis_name,))[0] or ()
                mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
                shards = math.prod(report.mesh[axis] for axis in mesh_axes)
                choices.append(sorted({size, size // shards}))
        for shape in itertools.product(*choices):
            forbidden.add(tuple(sorted(size for size in shape if size != 1)))
    return [
        collective
        for collective in hlo.of_kind(report.collectives, "all-gather")
        if any(
            tuple(sorted(size for size in shape if size != 1)) in forbidden
            for shape in collective.shapes
        )
    ]


@pytest.mark.parametrize("name", STEPS)
def test_step_compiles_fits_and_communicates_as_its_mesh_calls_for(compiled_step, name):
    """One test per configuration, so each compiles once whichever xdist worker runs it."""
    report = compiled_step(name)
    _assert_fits(report)
    _assert_no_gather_of_more_than_one_expert_shard(name, report)
    if name in EXPERT_SHARDED:
        _assert_tokens_exchanged_all_to_all(name, report)
    else:
        _assert_gradients_summed_and_no_tokens_exchanged(name, report)


def _assert_fits(report: aot.CompiledReport) -> None:
    assert report.num_devices == 8
    assert report.memory.total > 0
    assert report.fits, report.format()
    assert report.flops > 0


def _assert_no_gather_of_more_than_one_expert_shard(name: str, report: aot.CompiledReport):
    gathers = _expert_weight_gathers(name, report)
    assert gathers == [], "\n".join(
        f"{c.name}: {c.shapes} {c.dtypes} from {c.op_name}" for c in gathers
    )


def _assert_tokens_exchanged_all_to_all(name: str, report: aot.CompiledReport) -> None:
    exchanges = hlo.of_kind(report.collectives, "all-to-all") + hlo.of_kind(
        report.collectives, "ragged-all-to-all"
    )
    num_moe_layers = _config(name).model.num_layers
    # Forward: tokens out to their experts' shards and back; backward: the same, transposed.
    assert sum(c.executions for c in exchanges) >= 4 * num_moe_layers, report.format()


def _assert_gradients_summed_and_no_tokens_exchanged(name: str, report: aot.CompiledReport):
    totals = hlo.bytes_by_kind(report.collectives)
    assert totals["all-to-all"] == totals["ragged-all-to-all"] == 0, report.format()
    config = _config(name)
    spec = model_spec(config.model, config.attention)
    leaves = jax.tree.leaves(spec.abstract_params)
    param_bytes = sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in leaves)
    # Every replica holds all parameters, so every gradient is summed over the 8 replicas.
    assert totals["all-reduce"] + totals["reduce-scatter"] >= param_bytes, report.format()
