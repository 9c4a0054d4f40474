"""moejax.parallel.hlo reads the collectives of real compiled programs: kinds, shapes, bytes,
counts.

The CPU programs run on the eight fake devices of tests/conftest.py. XLA:CPU compiles every
collective synchronously and in float32, so the asynchronous `-start` / `-done` forms and bf16
results are checked on a program compiled for a TPU topology (needs libtpu).
"""

import math

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from moejax.parallel import hlo


def _compiled_text(body, mesh, *shapes, out_specs) -> str:
    """HLO of `body` under shard_map over mesh axis "x", every input sharded on its first axis."""
    sharding = NamedSharding(mesh, P("x"))
    mapped = jax.shard_map(body, mesh=mesh, in_specs=(P("x"),) * len(shapes), out_specs=out_specs)
    with jax.set_mesh(mesh):
        lowered = jax.jit(mapped, in_shardings=(sharding,) * len(shapes)).lower(*shapes)
        return lowered.compile().as_text()


@pytest.fixture(scope="module")
def cpu_mesh():
    return jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,), devices=jax.devices()[:8])


def _one_of_each(a, b):
    """a: [8, 16] f32 per chip, b: [8, 128] f32 per chip."""
    exchanged = jax.lax.all_to_all(a, "x", 0, 0, tiled=True)  # [8, 16]
    gathered = jax.lax.all_gather(b, "x", tiled=True)  # [64, 128]
    scattered = jax.lax.psum_scatter(a, "x", scatter_dimension=0, tiled=True)  # [1, 16]
    summed = jax.lax.psum(b, "x")  # [8, 128]
    shifted = jax.lax.ppermute(b, "x", [(i, (i + 1) % 8) for i in range(8)])  # [8, 128]
    return exchanged, gathered, scattered, summed, shifted


@pytest.fixture(scope="module")
def one_of_each(cpu_mesh) -> list[hlo.Collective]:
    text = _compiled_text(
        _one_of_each,
        cpu_mesh,
        jax.ShapeDtypeStruct((64, 16), jnp.float32),
        jax.ShapeDtypeStruct((64, 128), jnp.float32),
        out_specs=(P("x"),) * 5,
    )
    return hlo.collectives(text)


def test_each_collective_kind_is_found_once(one_of_each):
    kinds = sorted(collective.kind for collective in one_of_each)
    assert kinds == sorted(
        ["all-to-all", "all-gather", "reduce-scatter", "all-reduce", "collective-permute"]
    )


def test_result_shapes_and_bytes_are_the_per_chip_results(one_of_each):
    by_kind = {collective.kind: collective for collective in one_of_each}
    gather = by_kind["all-gather"]
    assert gather.shapes == ((64, 128),)
    assert gather.dtypes == ("f32",)
    assert gather.bytes == 64 * 128 * 4
    assert by_kind["reduce-scatter"].bytes == 1 * 16 * 4
    assert by_kind["all-reduce"].shapes == ((8, 128),)
    assert by_kind["all-reduce"].bytes == 8 * 128 * 4
    assert by_kind["collective-permute"].bytes == 8 * 128 * 4
    # XLA:CPU splits a tiled all-to-all into one operand per peer: eight [1, 16] results.
    exchanged = by_kind["all-to-all"]
    assert sum(math.prod(shape) for shape in exchanged.shapes) == 8 * 16
    assert exchanged.bytes == 8 * 16 * 4
    assert all(collective.executions == 1 for collective in one_of_each)


def test_replica_groups_and_permutation_pairs_are_kept(one_of_each):
    by_kind = {collective.kind: collective for collective in one_of_each}
    assert "x" in by_kind["all-gather"].replica_groups
    assert by_kind["all-gather"].op_name.endswith("shard_map/all_gather")
    pairs = by_kind["collective-permute"].replica_groups
    assert pairs.startswith("{{0,1},{1,2}") and pairs.endswith("{7,0}}")


def test_bytes_by_kind_sums_each_kind_and_lists_absent_kinds_as_zero(one_of_each):
    totals = hlo.bytes_by_kind(one_of_each + one_of_each)
    assert totals["all-gather"] == 2 * 64 * 128 * 4
    assert totals["all-reduce"] == 2 * 8 * 128 * 4
    assert totals["ragged-all-to-all"] == 0
    assert set(totals) == set(hlo.KINDS)


def test_gathers_of_matches_the_result_shape_up_to_size_one_axes(one_of_each):
    assert [c.kind for c in hlo.gathers_of(one_of_each, (64, 128))] == ["all-gather"]
    assert [c.kind for c in hlo.gathers_of(one_of_each, (1, 64, 1, 128))] == ["all-gather"]
    assert hlo.gathers_of(one_of_each, (64, 64)) == []
    assert hlo.gathers_of(one_of_each, (8, 128)) == []


def test_of_kind_rejects_an_unknown_kind(one_of_each):
    with pytest.raises(ValueError, match="'all-gathers' is not one of all-to-all"):
        hlo.of_kind(one_of_each, "all-gathers")


def test_a_collective_in_a_loop_counts_once_per_iteration(cpu_mesh):
    def repeated_sum(x):
        def body(carry, _):
            return carry + jax.lax.psum(carry, "x"), None

        return jax.lax.scan(body, x, None, length=3)[0]

    text = _compiled_text(
        repeated_sum, cpu_mesh, jax.ShapeDtypeStruct((64, 32), jnp.float32), out_specs=P("x")
    )
    (summed,) = hlo.collectives(text)
    assert summed.kind == "all-reduce"
    assert summed.executions == 3
    assert summed.bytes == 3 * 8 * 32 * 4


def test_a_program_without_collectives_has_none(cpu_mesh):
    text = _compiled_text(
        lambda x: x * 2, cpu_mesh, jax.ShapeDtypeStruct((64, 32), jnp.float32), out_specs=P("x")
    )
    assert hlo.collectives(text) == []


def test_text_without_an_entry_computation_is_refused():
    with pytest.raises(ValueError, match="no ENTRY computation"):
        hlo.collectives("HloModule empty\n")


def test_tpu_async_pairs_count_once_with_the_done_shape_in_bf16():
    pytest.importorskip("libtpu", reason="compiling for a TPU topology needs libtpu ([tpu] extra)")
    from jax.experimental import topologies

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2").devices
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,), devices=devices)

    def shift_and_gather(b):
        """b: [8, 1024] bf16 per chip."""
        shifted = jax.lax.ppermute(b, "x", [(i, (i + 1) % 8) for i in range(8)])
        return shifted, jax.lax.all_gather(b, "x", tiled=True)

    text = _compiled_text(
        shift_and_gather,
        mesh,
        jax.ShapeDtypeStruct((64, 1024), jnp.bfloat16),
        out_specs=(P("x"), P("x")),
    )
    assert "collective-permute-start" in text
    by_kind = {collective.kind: collective for collective in hlo.collectives(text)}
    assert sorted(by_kind) == ["all-gather", "collective-permute"]
    permute = by_kind["collective-permute"]
    assert permute.name.startswith("collective-permute-start")
    assert permute.shapes == ((8, 1024),)
    assert permute.dtypes == ("bf16",)
    assert permute.bytes == 8 * 1024 * 2
    assert by_kind["all-gather"].bytes == 64 * 1024 * 2


@pytest.mark.parametrize(
    ("groups", "size"),
    [
        ("mesh['data'=2,'fsdp'=1,'expert'=4,'tensor'=1] {'expert'}", 4),
        ("mesh['data'=2,'fsdp'=1,'expert'=4,'tensor'=1] {'data','expert'}", 8),
        ("mesh['data'=1,'fsdp'=1,'expert'=8,'tensor'=1] {'tensor'}", 1),
        ("{{0,1,2},{3,4,5}}", 3),
        ("[2,4]<=[8]", 4),
        ("", None),
    ],
)
def test_group_size_reads_every_replica_group_spelling(groups, size):
    assert hlo.group_size(groups) == size


def test_collectives_over_one_device_groups_are_left_out():
    """A psum over a mesh axis of size 1 stays in XLA:CPU's HLO but moves nothing."""
    mesh = jax.make_mesh((8, 1), ("x", "y"), axis_types=(AxisType.Auto,) * 2)

    def body(a):
        return jax.lax.psum(a, "y"), jax.lax.psum(a, "x")

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), out_specs=(P("x"), P())))
    text = fn.lower(jnp.ones((8, 4))).compile().as_text()
    found = hlo.collectives(text)
    assert [c.kind for c in found] == ["all-reduce"]
    assert hlo.group_size(found[0].replica_groups) == 8
