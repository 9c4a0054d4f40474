"""The expert-parallel dispatch compiled for an 8-chip TPU topology: ragged all-to-all forward
and backward, our grouped-matmul Mosaic kernels inside shard_map, no full expert-weight gather.

XLA:CPU has no ragged all-to-all, so this compile (and tests/moe/test_expert_parallel.py's emulated
exchange for the numbers) is how the TPU/GPU path is checked on a CPU machine.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding

pytest.importorskip("libtpu", reason="compiling for a TPU topology needs libtpu ([tpu] extra)")

from moejax import moe  # noqa: E402
from moejax.moe import expert_parallel  # noqa: E402
from moejax.parallel import aot, hlo, sharding  # noqa: E402
from moejax.routers.base import Routing  # noqa: E402

NUM_EXPERTS, D_MODEL, D_FF, TOKENS, TOP_K = 16, 256, 512, 1024, 2
WEIGHT_AXES = {
    "w_gate": ("expert", "embed", "expert_mlp"),
    "w_up": ("expert", "embed", "expert_mlp"),
    "w_down": ("expert", "expert_mlp", "embed"),
}


def _compiled_hlo(mesh_sizes: dict[str, int], strategy: str = "expert_parallel", **options) -> str:
    mesh = sharding.make_mesh(mesh_sizes, aot.topology_devices("v5p:2x2x2"))
    tokens = NamedSharding(mesh, sharding.logical_to_mesh(("batch", None)))
    weights = {
        name: NamedSharding(mesh, sharding.logical_to_mesh(axes))
        for name, axes in WEIGHT_AXES.items()
    }
    shapes = {
        "w_gate": (NUM_EXPERTS, D_MODEL, D_FF),
        "w_up": (NUM_EXPERTS, D_MODEL, D_FF),
        "w_down": (NUM_EXPERTS, D_FF, D_MODEL),
    }
    params = {
        name: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=weights[name])
        for name, shape in shapes.items()
    }
    x = jax.ShapeDtypeStruct((TOKENS, D_MODEL), jnp.bfloat16, sharding=tokens)
    index = jax.ShapeDtypeStruct((TOKENS, TOP_K), jnp.int32, sharding=tokens)
    combine = jax.ShapeDtypeStruct((TOKENS, TOP_K), jnp.bfloat16, sharding=tokens)

    def loss(x, params, combine, index):
        routing = Routing(index, combine, None, {})
        chosen = moe.get(strategy).options(**options)
        y = moe.moe_ffn(
            x, routing, params, strategy=strategy, options=chosen, mesh=sharding.kernel_mesh()
        ).y
        return jnp.sum(y.astype(jnp.float32))

    with jax.set_mesh(mesh):
        step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return step.lower(x, params, combine, index).compile().as_text()


@pytest.mark.parametrize(
    "mesh_sizes",
    [
        {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1},
        {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1},
        {"data": 1, "fsdp": 1, "expert": 8, "tensor": 1},
    ],
    ids=lambda sizes: "-".join(f"{a}{s}" for a, s in sizes.items() if s > 1),
)
def test_tpu_expert_parallel_uses_ragged_all_to_all_and_the_gmm_kernel(mesh_sizes):
    text = _compiled_hlo(mesh_sizes)
    found = hlo.collectives(text)
    ragged = hlo.of_kind(found, "ragged-all-to-all")
    # Forward: to the experts and back; backward: the same two, transposed.
    assert len(ragged) == 4, [c.name for c in ragged]
    assert 'custom_call_target="tpu_custom_call"' in text, "gmm must be our Mosaic kernel"
    shards = mesh_sizes["expert"]
    for shape in ((NUM_EXPERTS, D_MODEL, D_FF), (NUM_EXPERTS, D_FF, D_MODEL)):
        assert not hlo.gathers_of(found, shape)
        assert not hlo.gathers_of(found, (NUM_EXPERTS, shape[1] // mesh_sizes["fsdp"], shape[2]))
    # What a shard's experts receive is its ragged buffer: every row of its group's tokens.
    local_rows = TOKENS * TOP_K // (mesh_sizes["data"] * mesh_sizes["fsdp"] * shards)
    assert {c.shapes[0][0] for c in ragged} == {local_rows, local_rows * shards}


def test_tpu_llep_sends_rows_ragged_and_lends_weights_by_all_to_all():
    """LLEP on TPU: the same four ragged row exchanges, plus one all-to-all per expert weight
    lending the borrowed slots ([shards, max_foreign, ...]) and three carrying their gradients
    back to the owners; still no gather of the expert weights."""
    sizes = {"data": 1, "fsdp": 1, "expert": 8, "tensor": 1}
    text = _compiled_hlo(sizes, "llep", max_foreign=2)
    found = hlo.collectives(text)
    assert len(hlo.of_kind(found, "ragged-all-to-all")) == 4
    lent = [
        c
        for c in hlo.of_kind(found, "all-to-all")
        if c.shapes[0] in {(8, 2, D_MODEL, D_FF), (8, 2, D_FF, D_MODEL)}
    ]
    assert len(lent) == 6, [(c.name, c.shapes) for c in lent]
    assert 'custom_call_target="tpu_custom_call"' in text
    for shape in ((NUM_EXPERTS, D_MODEL, D_FF), (NUM_EXPERTS, D_FF, D_MODEL)):
        assert not hlo.gathers_of(found, shape)


def test_auto_exchange_is_ragged_under_a_tpu_mesh():
    mesh = sharding.make_mesh(
        {"data": 1, "fsdp": 1, "expert": 8, "tensor": 1}, aot.topology_devices("v5p:2x2x2")
    )
    with jax.set_mesh(mesh):
        assert expert_parallel.resolve_exchange("auto") == "ragged"
