"""The compiled train step with experts sharded: where the expert weights and their optimizer
state live, and which collectives move tokens rather than weights."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from moejax import config as config_lib
from moejax.parallel import hlo, sharding
from moejax.training import state as state_lib
from moejax.training import step as step_lib

# Expert shapes no activation of the tiny config has ([batch 8, length 32, d_model 32] does), so
# a gathered [8, 32, 48] can only be expert weights.
NUM_EXPERTS, EXPERT_D_FF = 8, 48
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


def _compiled_step(tiny_config, mesh_sizes: dict[str, int]):
    # One layer: every layer of the tiny config is a MoE layer, laid out and compiled alike.
    config = tiny_config(
        "model.num_layers=1",
        f"model.moe.num_experts={NUM_EXPERTS}",
        f"model.moe.expert_d_ff={EXPERT_D_FF}",
        "model.moe.dispatch.name=expert_parallel",
        *(f"mesh.{axis}={size}" for axis, size in mesh_sizes.items()),
    )
    config_lib.validate(config, jax.device_count())
    mesh = sharding.make_mesh(config.mesh.resolve(jax.device_count()))
    layout = state_lib.state_layout(config, mesh)
    batch_shape = (config.data.global_batch_size, config.data.seq_len)
    batch = {
        name: jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=sharding.batch_sharding(mesh))
        for name in ("inputs", "targets")
    }
    compiled = step_lib.make_train_step(layout, mesh).compile(layout.restore_target(), batch)
    return config, layout, compiled.as_text()


# One expert group of 8 shards; data and fsdp groups, the expert weights sharded over fsdp too;
# tensor parallelism, their d_ff sharded over tensor.
@pytest.mark.parametrize(
    "mesh_sizes",
    [
        {"data": 1, "fsdp": 1, "expert": 8, "tensor": 1},
        {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1},
        {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2},
    ],
    ids=lambda sizes: "-".join(f"{a}{s}" for a, s in sizes.items() if s > 1),
)
def test_expert_parallel_step_layout_and_collectives(tiny_config, mesh_sizes):
    config, layout, text = _compiled_step(tiny_config, mesh_sizes)
    expected = {
        "w_gate": P("expert", "fsdp", "tensor"),
        "w_up": P("expert", "fsdp", "tensor"),
        "w_down": P("expert", "tensor", "fsdp"),
    }
    adam = layout.shardings["opt_state"][1][0]  # chain(clip, adamw) -> adamw -> scale_by_adam
    for block in range(config.model.num_layers):
        for tree in (layout.shardings["params"], adam.mu, adam.nu):
            moe_params = tree["blocks"][block]["ffn"]
            for name in EXPERT_WEIGHTS:
                assert isinstance(moe_params[name], NamedSharding)
                assert moe_params[name].spec == expected[name], (block, name)

    assert hlo.of_kind(hlo.collectives(text), "all-to-all"), (
        "tokens must be exchanged by all-to-all"
    )
    m = config.model
    found = hlo.collectives(text)
    assert hlo.of_kind(found, "all-gather"), "the step gathers something (FSDP weights, counts)"
    for shape in (
        (NUM_EXPERTS, m.d_model, m.moe.expert_d_ff),
        (NUM_EXPERTS, m.moe.expert_d_ff, m.d_model),
    ):
        assert not hlo.gathers_of(found, shape), "every expert's weights on every device"
