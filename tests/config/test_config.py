"""Bad configurations fail before anything compiles, with the field, value and rule named."""

import dataclasses
import importlib.util
import re
from pathlib import Path

import jax
import pytest

from moejax import config as config_lib
from moejax.config import (
    Config,
    ConfigError,
    DispatchConfig,
    MeshConfig,
    MoEConfig,
    RouterConfig,
)

ROOT = Path(__file__).resolve().parents[2]


BAD = [
    # (overrides, substring naming the field, substring of the value or rule): a group's own
    # checks run when it is built, the cross-group ones in `validate`; both name the path.
    (["model.moe.top_k=5", "model.moe.num_experts=4"], "model.moe.top_k", "num_experts=4"),
    (["model.moe.top_k=0"], "model.moe.top_k", "1 <= top_k"),
    (["model.d_model=0"], "model.d_model", "positive"),
    (["model.num_layers=-2"], "model.num_layers", "positive"),
    (["model.moe.expert_d_ff=0"], "model.moe.expert_d_ff", "positive"),
    (["model.router.name=sinkhorn_typo"], "model.router.name", "softmax_top_k"),
    (["model.moe.dispatch.name=magic"], "model.moe.dispatch.name", "dropless, capacity"),
    (["model.num_kv_heads=3"], "model.num_kv_heads", "divisor of model.num_heads=4"),
    (["model.head_dim=31"], "model.head_dim", "even"),
    (["model.dtype=float16"], "model.dtype", "float32, bfloat16"),
    (
        ["model.moe.dispatch.name=capacity", "model.moe.dispatch.options.capacity_factor=0"],
        "model.moe.dispatch.options.capacity_factor",
        "positive",
    ),
    (["model.vocab_size=100"], "model.vocab_size", "byte-level"),
    (["model.router.load_balance_weight=-1"], "model.router.load_balance_weight", ">= 0"),
    (["model.router.name=top_p", "model.router.options.top_p=0"], "options.top_p", "(0, 1]"),
    (
        ["model.router.name=relu_rmsnorm", "model.router.options.sparsity_weight=-0.5"],
        "model.router.options.sparsity_weight",
        ">= 0",
    ),
    (["model.router.name=similarity_aware", "model.router.options.mix=2"], "options.mix", "[0, 1]"),
    (["model.router.name=recurrent", "model.router.options.state_dim=0"], "state_dim", ">= 1"),
    (["model.router.name=recurrent", "model.depth.mod_every=2"], "model.depth.mod_every", "state"),
    (["model.depth.mod_capacity=1.5"], "model.depth.mod_capacity", "(0, 1]"),
    (
        ["model.depth.mod_every=2", "model.depth.layer_router_dim=8"],
        "model.depth.layer_router_dim",
        "one depth router",
    ),
    (
        ["model.moe.dispatch.name=llep", "model.moe.dispatch.options.max_foreign=0"],
        "model.moe.dispatch.options.max_foreign",
        ">= 1",
    ),
    (
        ["model.moe.dispatch.name=expert_parallel", "model.moe.dispatch.options.exchange=nccl"],
        "model.moe.dispatch.options.exchange",
        "auto, ragged, padded",
    ),
    # Expert parallelism is named: dropless over expert shards, and expert_parallel without
    # them, are config errors naming the strategies that fit.
    (["mesh.data=2", "mesh.expert=4"], "mesh.expert", "for 4 expert shards name one of: capacity"),
    (
        ["mesh.data=8", "model.moe.dispatch.name=expert_parallel"],
        "mesh.expert",
        "> 1 for dispatch 'expert_parallel'",
    ),
    # Options of a strategy other than the chosen one: the error lists the chosen one's.
    (
        ["model.moe.dispatch.options.capacity_factor=2"],
        "model.moe.dispatch.options.capacity_factor",
        "(DroplessOptions): gmm_impl",
    ),
    # The flat fields of before the dispatch options were nested name their new path.
    (
        ["model.moe.capacity_factor=2"],
        "model.moe.capacity_factor",
        "model.moe.dispatch.options.capacity_factor now",
    ),
    (["model.moe.gmm_impl=xla"], "model.moe.gmm_impl", "model.moe.dispatch.options.gmm_impl now"),
    (["model.moe.expert_balance=llep"], "model.moe.expert_balance", "model.moe.dispatch.name=llep"),
    (["attention.block_size=0"], "attention.block_size", ">= 1"),
    (["attention.kind=sparse"], "attention.kind", "dense, local"),
    (["pruning.target_sparsity=1.5"], "pruning.target_sparsity", "[0, 1)"),
    (["pruning.param_regex=("], "pruning.param_regex", "valid regex"),
    (["data.seq_len=512"], "data.seq_len", "max_seq_len=256"),
    (["data.global_batch_size=0"], "data.global_batch_size", "positive"),
    (["data.global_batch_size=12"], "data.global_batch_size", "data*fsdp*expert=8"),
    (["train.warmup_steps=5000"], "train.warmup_steps", "train.steps="),
    (["train.learning_rate=-1.0"], "train.learning_rate", "positive"),
    (["train.beta2=1.0"], "train.beta2", "[0, 1)"),
    (["mesh.data=3"], "mesh", "8 are present"),
    (["mesh.data=-1", "mesh.expert=-1"], "mesh.", "at most one axis"),
    (["mesh.data=1", "mesh.expert=8"], "model.moe.num_experts", "mesh.expert=8"),
    (["mesh.data=-1", "mesh.tensor=3"], "mesh", "divide the device count"),
]


@pytest.mark.parametrize(("overrides", "field_text", "rule_text"), BAD)
def test_invalid_config_names_field_value_and_rule(overrides, field_text, rule_text):
    with pytest.raises(ConfigError) as error:
        config = config_lib.apply_overrides(Config(), overrides)
        config_lib.validate(config, num_devices=8)
    message = str(error.value)
    assert field_text in message
    assert rule_text in message


def test_groups_check_themselves_when_built():
    """A group built in Python (a config file) is checked as the command line's are."""
    with pytest.raises(ConfigError, match=r"model\.moe\.top_k: got 5"):
        MoEConfig(num_experts=4, top_k=5)
    with pytest.raises(ConfigError, match=r"model\.router\.options: got TopKOptions"):
        RouterConfig(name="top_p", options=RouterConfig().options)
    with pytest.raises(ConfigError, match=r"model\.router\.options\.top_p: got 1\.5"):
        RouterConfig.of("top_p", top_p=1.5)
    assert RouterConfig.of("top_p", top_p=0.5).options.top_p == 0.5
    assert RouterConfig(name="top_p").options.top_p == 0.4  # the router's default


def test_default_configs_are_valid_on_one_and_eight_devices():
    for name in ("default", "tiny"):
        config = config_lib.load_config_file(ROOT / "configs" / f"{name}.py")
        assert config_lib.validate(config, 1)["data"] == 1
        assert config_lib.validate(config, 8)["data"] == 8


def test_dispatch_name_override_starts_from_the_new_strategys_options_in_any_order():
    orders = [
        ["model.moe.dispatch.options.capacity_factor=2.0", "model.moe.dispatch.name=capacity"],
        ["model.moe.dispatch.name=capacity", "model.moe.dispatch.options.capacity_factor=2.0"],
    ]
    for overrides in orders:
        dispatch = config_lib.apply_overrides(Config(), overrides).model.moe.dispatch
        assert dispatch == DispatchConfig.of("capacity", capacity_factor=2.0)
        assert dispatch.options.priority == "order"  # the rest: capacity's defaults
    # Options of the strategy named before do not carry over to another one.
    tuned = config_lib.apply_overrides(Config(), ["model.moe.dispatch.options.gmm_impl=xla"])
    llep = config_lib.apply_overrides(tuned, ["model.moe.dispatch.name=llep"]).model.moe.dispatch
    assert llep.options == DispatchConfig(name="llep").options
    # The same name keeps the options set before.
    same = config_lib.apply_overrides(tuned, ["model.moe.dispatch.name=dropless"])
    assert same.model.moe.dispatch.options.gmm_impl == "xla"
    # A group built in Python checks its options' class.
    with pytest.raises(ConfigError, match=r"model\.moe\.dispatch\.options: got Dropless"):
        DispatchConfig(name="capacity", options=DispatchConfig().options)
    assert DispatchConfig(name="llep").options.max_foreign == 2  # the strategy's default


def test_overrides_parse_by_field_type():
    config = config_lib.apply_overrides(
        Config(),
        [
            "model.moe.num_experts=8",
            "model.router.options.renormalize=false",
            "train.learning_rate=1e-4",
            "model.router.name=softmax_top_k",
            "mesh.expert=2",
        ],
    )
    assert config.model.moe.num_experts == 8 and config.model.router.options.renormalize is False
    assert config.train.learning_rate == 1e-4 and config.mesh.expert == 2


def test_router_name_override_starts_from_the_new_routers_options_in_any_order():
    orders = [
        ["model.router.options.top_p=0.7", "model.router.name=top_p"],
        ["model.router.name=top_p", "model.router.options.top_p=0.7"],
    ]
    for overrides in orders:
        router = config_lib.apply_overrides(Config(), overrides).model.router
        assert router.name == "top_p" and router.options.top_p == 0.7
        assert router.options.entropy_weight == 1e-4  # the rest: top_p's defaults
    # Options of the router named before do not carry over to another router.
    top_p = config_lib.apply_overrides(Config(), ["model.router.name=top_p"])
    back = config_lib.apply_overrides(top_p, ["model.router.name=cosine"]).model.router
    assert back.options == RouterConfig(name="cosine").options
    # The same name keeps the options set before.
    tuned = config_lib.apply_overrides(Config(), orders[0])
    same = config_lib.apply_overrides(tuned, ["model.router.name=top_p"]).model.router
    assert same.options.top_p == 0.7


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.moe.num_expert=8", "unknown field 'model.moe.num_expert'; allowed fields of"),
        ("model.num_experts=8", "unknown field 'model.num_experts' (it is model.moe.num_experts"),
        ("optim.lr=1", "unknown field 'optim.lr'"),
        ("model.moe.num_experts=eight", "model.moe.num_experts: value 'eight' is not a valid int"),
        ("model.router.options.renormalize=maybe", "not a boolean"),
        ("model.router.options.top_p=0.5", "allowed fields of model.router.options (TopKOptions)"),
        ("model.moe=4", "'model.moe' is a group"),
        ("model.moe.num_experts", "expected the form group.field=value"),
    ],
)
def test_bad_override_is_rejected(override, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        config_lib.apply_overrides(Config(), [override])


def test_json_round_trip(tmp_path):
    config = config_lib.apply_overrides(
        Config(),
        ["model.moe.top_k=1", "data.seq_len=64", "model.router.name=top_p"]
        + ["model.router.options.top_p=0.6", "model.depth.mod_every=2"],
    )
    config_lib.save_json(config, tmp_path / "config.json")
    assert config_lib.load_json(tmp_path / "config.json") == config


def test_config_json_of_the_flat_model_layout_reads_as_the_same_model():
    """Workdirs written before the model group was split keep resuming."""
    flat = {
        "model": {
            "d_model": 64,
            "moe_every": 2,
            "num_experts": 8,
            "top_k": 1,
            "router": "top_p",
            "top_p": 0.3,
            "router_entropy_weight": 0.0,
            "renormalize_top_k": False,
            "graph_mix": 0.5,  # not an option of top_p: it did nothing, so it is dropped
            "load_balance_weight": 0.02,
            "halting_threshold": 0.1,
            "mod_every": 0,
        },
        "train": {"steps": 10, "warmup_steps": 1},
    }
    model = config_lib.from_dict(flat).model
    assert model.d_model == 64
    assert (model.moe.every, model.moe.num_experts, model.moe.top_k) == (2, 8, 1)
    assert model.moe.halting_threshold == 0.1
    assert model.router == RouterConfig(
        name="top_p",
        options=RouterConfig.of("top_p", top_p=0.3, entropy_weight=0.0, renormalize=False).options,
        load_balance_weight=0.02,
    )


def test_config_json_of_the_flat_dispatch_fields_reads_as_the_same_strategy():
    """Workdirs written before the dispatch options were nested keep resuming: the strategy's
    own fields become its options, the others (which did nothing) are dropped."""
    old = {
        "dispatch": "capacity",
        "capacity_factor": 2.0,
        "capacity_priority": "score",
        "gmm_impl": "xla",  # not an option of capacity
        "expert_balance": "none",
        "llep_margin": 0.1,
        "num_experts": 8,
    }
    moe_config = config_lib.from_dict({"model": {"moe": old}}).model.moe
    assert moe_config.num_experts == 8
    assert moe_config.dispatch == DispatchConfig.of(
        "capacity", capacity_factor=2.0, priority="score"
    )
    balanced = {"dispatch": "dropless", "expert_balance": "llep", "llep_max_foreign": 3}
    dispatch = config_lib.from_dict({"model": {"moe": balanced}}).model.moe.dispatch
    assert dispatch == DispatchConfig.of("llep", max_foreign=3)


def test_flat_fields_name_every_leaf_by_its_path():
    flat = config_lib.flat_fields(Config())
    assert flat["model.moe.top_k"] == 2 and flat["model.router.options.renormalize"] is True
    assert flat["model.depth.mod_every"] == 0 and flat["train.steps"] == 1600
    assert not any(dataclasses.is_dataclass(value) for value in flat.values())


def test_mesh_resolves_wildcard():
    assert MeshConfig(data=-1, expert=4).resolve(8) == {
        "data": 2,
        "fsdp": 1,
        "expert": 4,
        "tensor": 1,
    }
    assert config_lib.validate_mesh(MeshConfig(data=2, fsdp=2, expert=2, tensor=1), 8)


def _load_train_module():
    spec = importlib.util.spec_from_file_location("moejax_train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv",
    [
        ["--config.model.moe.top_k=9"],
        ["--config.model.router.name=nope"],
        ["--config.model.router.options.top_p=0.5"],
        ["--config.mesh.data=3"],
        ["--config.model.no_such_field=1"],
        ["--config.data.seq_len=100000"],
    ],
)
def test_train_cli_rejects_bad_config_before_compiling(argv, tmp_path, capsys):
    compiled = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **kw: compiled.append(event) if "compile" in event else None
    )
    train_cli = _load_train_module()
    status = train_cli.main(
        ["--config", str(ROOT / "configs/tiny.py"), "--workdir", str(tmp_path / "run"), *argv]
    )
    assert status == 2
    assert "config error" in capsys.readouterr().err
    assert compiled == []
    assert not (tmp_path / "run").exists()
