"""Bad configurations fail before anything compiles, with the field, value and rule named."""

import dataclasses
import importlib.util
from pathlib import Path

import jax
import pytest

from moejax import config as config_lib
from moejax.config import Config, ConfigError, MeshConfig

ROOT = Path(__file__).resolve().parents[1]


def _replace(config: Config, group: str, **fields) -> Config:
    return dataclasses.replace(
        config, **{group: dataclasses.replace(getattr(config, group), **fields)}
    )


BAD = [
    # (group, fields, substring naming the field, substring of the value or rule)
    ("model", {"top_k": 5, "num_experts": 4}, "model.top_k", "num_experts=4"),
    ("model", {"top_k": 0}, "model.top_k", "1 <= top_k"),
    ("model", {"d_model": 0}, "model.d_model", "positive"),
    ("model", {"num_layers": -2}, "model.num_layers", "positive"),
    ("model", {"expert_d_ff": 0}, "model.expert_d_ff", "positive"),
    ("model", {"router": "sinkhorn_typo"}, "model.router", "softmax_top_k"),
    ("model", {"dispatch": "magic"}, "model.dispatch", "capacity, dropless"),
    ("model", {"num_kv_heads": 3}, "model.num_kv_heads", "divisor of model.num_heads=4"),
    ("model", {"head_dim": 31}, "model.head_dim", "even"),
    ("model", {"dtype": "float16"}, "model.dtype", "float32, bfloat16"),
    ("model", {"capacity_factor": 0.0}, "model.capacity_factor", "positive"),
    ("model", {"vocab_size": 100}, "model.vocab_size", "byte-level"),
    ("data", {"seq_len": 512}, "data.seq_len", "max_seq_len=256"),
    ("data", {"global_batch_size": 0}, "data.global_batch_size", "positive"),
    ("data", {"global_batch_size": 12}, "data.global_batch_size", "data*fsdp*expert=8"),
    ("train", {"warmup_steps": 5000}, "train.warmup_steps", "train.steps="),
    ("train", {"learning_rate": -1.0}, "train.learning_rate", "positive"),
    ("train", {"beta2": 1.0}, "train.beta2", "[0, 1)"),
    ("mesh", {"data": 3}, "mesh", "8 are present"),
    ("mesh", {"data": -1, "expert": -1}, "mesh.", "at most one axis"),
    ("mesh", {"data": 1, "expert": 8}, "model.num_experts", "mesh.expert=8"),
    ("mesh", {"data": -1, "tensor": 3}, "mesh", "divide the device count"),
]


@pytest.mark.parametrize(("group", "fields", "field_text", "rule_text"), BAD)
def test_invalid_config_names_field_value_and_rule(group, fields, field_text, rule_text):
    config = _replace(Config(), group, **fields)
    with pytest.raises(ConfigError) as error:
        config_lib.validate(config, num_devices=8)
    message = str(error.value)
    assert field_text in message
    assert rule_text in message


def test_default_configs_are_valid_on_one_and_eight_devices():
    for name in ("default", "tiny"):
        config = config_lib.load_config_file(ROOT / "configs" / f"{name}.py")
        assert config_lib.validate(config, 1)["data"] == 1
        assert config_lib.validate(config, 8)["data"] == 8


def test_overrides_parse_by_field_type():
    config = config_lib.apply_overrides(
        Config(),
        [
            "model.num_experts=8",
            "model.renormalize_top_k=false",
            "train.learning_rate=1e-4",
            "model.router=softmax_top_k",
            "mesh.expert=2",
        ],
    )
    assert config.model.num_experts == 8 and config.model.renormalize_top_k is False
    assert config.train.learning_rate == 1e-4 and config.mesh.expert == 2


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.num_expert=8", "unknown field 'model.num_expert'; allowed fields of model"),
        ("optim.lr=1", "unknown field 'optim.lr'"),
        ("model.num_experts=eight", "model.num_experts: value 'eight' is not a valid int"),
        ("model.renormalize_top_k=maybe", "not a boolean"),
        ("model.num_experts", "expected the form group.field=value"),
    ],
)
def test_bad_override_is_rejected(override, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        config_lib.apply_overrides(Config(), [override])


def test_json_round_trip(tmp_path):
    config = config_lib.apply_overrides(Config(), ["model.top_k=1", "data.seq_len=64"])
    config_lib.save_json(config, tmp_path / "config.json")
    assert config_lib.load_json(tmp_path / "config.json") == config


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
        ["--config.model.top_k=9"],
        ["--config.model.router=nope"],
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
