"""The `attention` config group: the kind by name, its typed options nested under it, set from
the command line and read back from JSON."""

import pytest

from moejax import config as config_lib
from moejax.errors import ConfigError
from moejax.sparse_attention import AttentionConfig
from moejax.sparse_attention.moba import MobaOptions
from moejax.sparse_attention.routing import RoutingOptions


def _overridden(*overrides: str) -> AttentionConfig:
    return config_lib.apply_overrides(config_lib.Config(), overrides).attention


def test_naming_a_kind_starts_its_options_from_the_kinds_defaults():
    attention = _overridden("attention.kind=moba")
    assert attention.options == MobaOptions()
    routing = config_lib.apply_overrides(
        config_lib.Config(), ["attention.kind=routing", "attention.options.top_k=7"]
    )
    assert routing.attention.options == RoutingOptions(top_k=7)
    # Another kind drops the routing options: none of them carries over.
    moba = config_lib.apply_overrides(routing, ["attention.kind=moba"]).attention
    assert moba.options == MobaOptions()
    # The same kind again keeps them.
    same = config_lib.apply_overrides(routing, ["attention.kind=routing"]).attention
    assert same.options.top_k == 7


@pytest.mark.parametrize("order", [1, -1])
def test_kind_and_its_options_apply_in_any_order(order):
    overrides = ["attention.kind=moba", "attention.options.query_block_size=4"][::order]
    attention = _overridden(*overrides, "attention.block_size=16")
    assert attention.options == MobaOptions(query_block_size=4)
    assert attention.block_q == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["attention.kind=moba", "attention.options.window=8"],
            "unknown field 'attention.options.window'; allowed fields of attention.options "
            "\\(MobaOptions\\): top_k, query_block_size",
        ),
        (
            ["attention.options.top_k=2"],
            "unknown field 'attention.options.top_k'; allowed fields of attention.options "
            "\\(DenseOptions\\): $",
        ),
        (
            ["attention.kind=local", "attention.window=8"],
            "unknown field 'attention.window' \\(it is attention.options.window now, an option "
            "of the attention kinds local, global_local, routing, dynamic_mask",
        ),
        (["attention.top_k=2"], "it is attention.options.top_k now"),
        (["attention.kind=moba", "attention.options.top_k=0"], "attention.options.top_k: got 0"),
        (
            [
                "attention.kind=moba",
                "attention.block_size=16",
                "attention.options.query_block_size=5",
            ],
            "attention.options.query_block_size: got 5; allowed: None or a divisor of "
            "attention.block_size=16",
        ),
    ],
)
def test_options_the_kind_lacks_or_refuses_are_errors_naming_the_path(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _overridden(*overrides)


def test_json_round_trip_keeps_the_kind_and_its_options():
    config = config_lib.apply_overrides(
        config_lib.Config(),
        ["attention.kind=routing", "attention.options.shared_qk=false", "attention.block_size=32"],
    )
    assert config_lib.from_dict(config_lib.to_dict(config)) == config
    assert config_lib.flat_fields(config)["attention.options.shared_qk"] is False


def test_of_builds_the_kinds_options():
    attention = AttentionConfig.of("routing", options={"num_clusters": 2}, block_size=8)
    assert attention.options == RoutingOptions(num_clusters=2)
    assert attention.shares_qk and attention.uses_block_kernel
    assert not AttentionConfig().uses_block_kernel
    assert AttentionConfig.of("dense", flux_router=True).uses_block_kernel


def test_a_config_json_with_the_flat_attention_group_reads_as_its_kind_and_options():
    """Runs saved before the kinds had their own options keep loading (eval.py, resume)."""
    saved = config_lib.to_dict(config_lib.Config())
    saved["attention"] = {
        "kind": "moba",
        "block_size": 32,
        "query_block_size": 8,
        "top_k": 2,
        "window": 256,
        "num_global": 0,
        "key_conv_width": 3,
        "num_clusters": 4,
        "centroid_momentum": 0.99,
        "shared_qk": True,
        "flux_router": False,
        "flux_hidden": 32,
        "flux_target_full_share": 0.5,
        "impl": "auto",
    }
    attention = config_lib.from_dict(saved).attention
    assert attention == AttentionConfig.of(
        "moba", options={"top_k": 2, "query_block_size": 8}, block_size=32, key_conv_width=3
    )
