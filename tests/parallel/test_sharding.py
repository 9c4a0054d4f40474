"""Logical axis names map onto the mesh through the one rules table."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from moejax.config import Config, ModelConfig, MoEConfig
from moejax.parallel import sharding
from moejax.training import state as state_lib


def _shardings(axis_sizes):
    mesh = sharding.make_mesh(axis_sizes)
    layout = state_lib.state_layout(
        Config(model=ModelConfig(moe=MoEConfig(num_experts=4, every=1))), mesh
    )
    return layout.abstract_state, layout.shardings


def test_logical_to_mesh_uses_rules_table():
    assert sharding.logical_to_mesh(("expert", "embed", "expert_mlp")) == P(
        "expert", "fsdp", "tensor"
    )
    assert sharding.logical_to_mesh(("batch", "length")) == P(("data", "fsdp", "expert"), None)
    with pytest.raises(ValueError, match="logical axis 'nonsense' has no rule"):
        sharding.logical_to_mesh(("nonsense",))


def test_expert_attention_and_optimizer_state_partition_specs():
    _, shardings = _shardings({"data": 1, "fsdp": 2, "expert": 2, "tensor": 2})
    layer = shardings["params"]["blocks"][0]
    assert layer["ffn"]["w_gate"].spec == P("expert", "fsdp", "tensor")
    assert layer["ffn"]["w_up"].spec == P("expert", "fsdp", "tensor")
    assert layer["ffn"]["w_down"].spec == P("expert", "tensor", "fsdp")
    assert layer["ffn"]["router"].spec == P("fsdp", None)
    assert layer["attention"]["w_q"].spec == P("fsdp", "tensor", None)
    assert layer["attention"]["w_k"].spec == P("fsdp", "tensor", None)
    assert layer["attention"]["w_o"].spec == P("tensor", None, "fsdp")
    assert shardings["params"]["embedding"].spec == P("tensor", "fsdp")

    adam = shardings["opt_state"][1][0]  # chain(clip, adamw) -> adamw -> scale_by_adam
    for moment in (adam.mu, adam.nu):
        moment_layer = moment["blocks"][0]
        assert moment_layer["ffn"]["w_gate"].spec == P("expert", "fsdp", "tensor")
        assert moment_layer["attention"]["w_q"].spec == P("fsdp", "tensor", None)
    assert adam.count.spec == P()


def test_params_are_created_in_their_sharded_layout():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "expert": 4, "tensor": 1})
    config = Config()
    state = state_lib.init_state(config, state_lib.state_layout(config, mesh))
    w_gate = state["params"]["blocks"][1]["ffn"]["w_gate"]
    assert w_gate.sharding.spec == P("expert", "fsdp", "tensor")
    # Each of the 4 expert shards holds one expert on each device.
    assert {shard.data.shape[0] for shard in w_gate.addressable_shards} == {1}
    assert len(jax.devices()) == 8
