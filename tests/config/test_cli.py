"""The command line of train.py and eval.py: `--config path.py:arg`, `--flagfile`, and `--help`
listing every config field. Each main() call here exits before anything trains."""

import argparse
import importlib.util
import pathlib

import pytest

from moejax import cli
from moejax import config as config_lib
from moejax.config import Config, MoEConfig, TrainConfig
from moejax.pruning.config import LMPruningConfig
from moejax.pruning.srste import SRSTEOptions

ROOT = pathlib.Path(__file__).resolve().parents[2]

CONFIG_WITH_ARG = """
import dataclasses

from moejax.config import Config, TrainConfig


def get_config(steps):
    return dataclasses.replace(Config(), train=TrainConfig(steps=int(steps), warmup_steps=0))
"""


def _program(name: str):
    spec = importlib.util.spec_from_file_location(f"moejax_{name}_cli", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _help(program: str, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        _program(program).main([*argv, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_help_lists_every_config_field_with_its_type_default_and_meaning(capsys):
    text = _help("eval", [], capsys)
    for path in config_lib.flat_fields(Config()):
        assert f"--config.{path} " in text, path
    assert "--config.model.moe.num_experts INT Routed experts in each MoE layer. (default: 4)" in (
        text
    )
    assert (
        "--config.model.moe.dispatch.options.gmm_impl STR The grouped matmul implementation" in text
    )
    assert "--config.model.router.options.renormalize BOOL" in text
    assert "--config.data.eval_batches INT Number of validation batches per evaluation;" in text
    # From the class docstrings: AttentionConfig's entries; from the comments: the pruning
    # choices, and the options of the chosen (default) schedule nested under it.
    assert "--config.attention.block_size INT kv block" in text
    assert "--config.pruning.method.name STR The method, a name from" in text
    assert "--config.pruning.schedule.options.begin_step INT" in text
    assert "model.moe (MoEConfig; defaults from moejax.config.Config" in text


def test_help_shows_the_config_files_defaults_and_helpfull_is_help(capsys):
    text = _help("train", ["--config", str(ROOT / "configs" / "tiny.py")], capsys)
    tiny = config_lib.load_config_file(ROOT / "configs" / "tiny.py")
    assert (
        f"--config.model.d_model INT Width of the residual stream. (default: {tiny.model.d_model})"
        in text
    )
    assert "--config PATH[:ARG]" in text and "--flagfile FILE" in text
    with pytest.raises(SystemExit):
        _program("train").main(["--config", str(ROOT / "configs" / "tiny.py"), "--helpfull"])
    assert " ".join(capsys.readouterr().out.split()) == text


def test_config_arg_is_passed_to_get_config(tmp_path, capsys):
    path = tmp_path / "stepped.py"
    path.write_text(CONFIG_WITH_ARG)
    config_file = cli.ConfigFile.parse(f"{path}:7")
    assert (config_file.path, config_file.arg, config_file.name) == (path, "7", "stepped_7")
    assert cli.load_config(config_file, Config).train.steps == 7
    assert cli.ConfigFile.parse(str(path)) == cli.ConfigFile(path)
    text = _help("train", ["--config", f"{path}:9"], capsys)
    assert "--config.train.steps INT Optimiser steps of the run. (default: 9)" in text


def test_config_arg_for_a_get_config_without_one_is_an_input_error(tmp_path, capsys):
    status = _program("train").main(
        ["--config", f"{ROOT / 'configs' / 'tiny.py'}:9", "--workdir", str(tmp_path / "run")]
    )
    assert status == 2
    err = capsys.readouterr().err
    assert "get_config('9')" in err and "TypeError" in err
    assert not (tmp_path / "run").exists()


def test_flagfile_flags_are_read_in_place_nested_and_with_comments(tmp_path):
    inner = tmp_path / "inner.flags"
    inner.write_text("--config.model.moe.top_k=1\n")
    outer = tmp_path / "outer.flags"
    outer.write_text(
        "# a comment\n"
        f"--config={tmp_path / 'stepped.py'}:3\n"
        "\n"
        "// another\n"
        "--config.train.steps=400\n"
        f"--flagfile={inner}\n"
    )
    parser = argparse.ArgumentParser()
    cli.add_config_flag(parser)
    args, overrides = cli.parse(parser, ["--flagfile", str(outer), "--config.train.steps=500"])
    assert args.config == cli.ConfigFile(tmp_path / "stepped.py", "3")
    # Later flags win: the command line's steps=500 comes after the file's steps=400.
    assert overrides == ["train.steps=400", "model.moe.top_k=1", "train.steps=500"]
    assert config_lib.apply_overrides(Config(), overrides).train.steps == 500
    with pytest.raises(config_lib.ConfigError, match="--flagfile: cannot read"):
        cli.expand_flagfiles([f"--flagfile={tmp_path / 'missing.flags'}"])
    (tmp_path / "loop.flags").write_text(f"--flagfile={tmp_path / 'loop.flags'}\n")
    with pytest.raises(config_lib.ConfigError, match="nested"):
        cli.expand_flagfiles([f"--flagfile={tmp_path / 'loop.flags'}"])


def test_train_reads_overrides_from_a_flagfile(tmp_path, capsys):
    flags = tmp_path / "run.flags"
    flags.write_text(f"--config={ROOT / 'configs' / 'tiny.py'}\n--config.model.moe.top_k=99\n")
    status = _program("train").main(["--flagfile", str(flags), "--workdir", str(tmp_path / "r")])
    assert status == 2
    assert "model.moe.top_k" in capsys.readouterr().err


def test_field_help_reads_comments_docstrings_and_inherited_fields():
    moe = cli.field_help(MoEConfig)
    assert moe["top_k"] == "Experts each token is sent to."
    assert moe["every"].startswith("Layer i is a MoE layer when (i + 1) % every == 0")
    assert "every" not in cli.field_help(TrainConfig) and "min_lr_ratio" in cli.field_help(
        TrainConfig
    )
    # Fields of the base class PruningConfig, several entries to a docstring line.
    pruning = cli.field_help(LMPruningConfig)
    assert pruning["method"] == 'how training uses the masks ("none" disables pruning).'
    assert pruning["score"] == pruning["pattern"] == pruning["schedule"]
    assert pruning["score"].startswith("how masks are computed and when.")
    assert pruning["param_regex"] == pruning["min_ndim"]
    # A method's options: one entry for three fields continued on unindented lines.
    srste = cli.field_help(SRSTEOptions)
    assert srste["flow_begin"] == srste["flow_end"] == srste["flow_intervals"]
    assert srste["flow_intervals"].startswith("*Progressive Gradient Flow for Robust N:M")
    assert srste["decay"].startswith("λ of the refine term")
    assert cli.type_name(int | None) == "int | None" and cli.type_name(bool) == "bool"
