"""Hugging Face checkpoints into moejax and back, against `transformers` itself.

The references are computed by `transformers` 5.17 (PyTorch on the CPU) in a separate Python
3.11 environment (`.venv-hf`, `scripts/setup.sh`): PyTorch for our Python 3.12 is a 5 GB CUDA
build, while a CPU build for 3.11 installs in seconds. `scripts/hf_reference.py` builds one tiny
random checkpoint per architecture (weights drawn at a scale where a dropped norm or a transposed
projection moves the logits by about their own size) with prefill logits and 16 steps of
KV-cached greedy decoding; the round trip loads our exports back into `transformers`. Nothing
here is a stored fixture: every reference comes from `transformers` in this run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.errors import UserError
from moejax.generation import generate
from moejax.pretrained import from_hf, to_hf
from moejax.pretrained.safetensors import SafetensorsFile
from tests.pretrained.reference import (
    ARCHITECTURES,
    reference_logits_many,
    shared_checkpoints,
)

# float32 agreement, relative to the largest |logit| (the bound).
RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoints(build_once) -> Path:
    return shared_checkpoints(build_once)


def _reference(checkpoints: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(checkpoints / name / "reference.npz") as data:
        return dict(data)


def _bound(logits: np.ndarray) -> float:
    return RELATIVE_TOLERANCE * float(np.abs(logits).max())


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_prefill_and_cached_decode_match_transformers(checkpoints, name):
    reference = _reference(checkpoints, name)
    model, _ = from_hf(checkpoints / name)
    logits, _ = model(jnp.asarray(reference["tokens"]), train=False)
    assert np.abs(np.asarray(logits) - reference["logits"]).max() <= _bound(reference["logits"])

    prompts = [list(p) for p in reference["decode_prompt"]]
    out = generate(model, prompts, max_new_tokens=reference["decode_tokens"].shape[1])
    np.testing.assert_array_equal(np.array(out.tokens), reference["decode_tokens"])
    difference = np.abs(out.logits - reference["decode_logits"]).max()
    assert difference <= _bound(reference["decode_logits"])


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_bfloat16_load_stays_near_transformers_bfloat16(checkpoints, name):
    """bf16 weights and activations: routing may flip where two experts' scores tie within
    bf16 precision, so the agreement is stated on the median, and on most positions' argmax."""
    reference = _reference(checkpoints, name)
    model, config = from_hf(checkpoints / name, dtype="bfloat16")
    assert config.param_dtype == "bfloat16"
    logits = np.asarray(model(jnp.asarray(reference["tokens"]), train=False)[0])
    scale = float(reference["logits"].std())
    assert np.median(np.abs(logits - reference["logits_bf16"])) < 0.05 * scale
    same_top = np.mean(logits.argmax(-1) == reference["logits_bf16"].argmax(-1))
    assert same_top >= 0.75


def test_export_round_trips_through_transformers(checkpoints, tmp_path):
    """Each architecture exported by `to_hf` holds the checkpoint's tensors exactly and gives
    transformers the same logits; one subprocess checks all of them."""
    pairs = []
    for name in ARCHITECTURES:
        source = checkpoints / name
        model, _ = from_hf(source)
        exported = to_hf(model, tmp_path / name, like=source)
        assert (exported / "tokenizer.json").is_file()
        _assert_same_tensors(source, exported)
        pairs.append((exported, _reference(checkpoints, name)["tokens"]))
    for name, logits in zip(ARCHITECTURES, reference_logits_many(pairs), strict=True):
        expected = _reference(checkpoints, name)["logits"]
        assert np.abs(logits - expected).max() <= _bound(expected), name


def _tensors(directory: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        shard = SafetensorsFile(file)
        tensors.update({name: np.array(shard.tensor(name)) for name in shard.names()})
    return tensors


def _assert_same_tensors(source: Path, exported: Path) -> None:
    original, ours = _tensors(source), _tensors(exported)
    assert sorted(original) == sorted(ours)
    for name, value in original.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)


def test_export_shards_with_an_index_that_loads_back(checkpoints, tmp_path):
    model, _ = from_hf(checkpoints / "olmoe")
    exported = to_hf(model, tmp_path / "olmoe", like=checkpoints / "olmoe", max_shard_bytes=40_000)
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again, _ = from_hf(exported)
    tokens = jnp.asarray(_reference(checkpoints, "olmoe")["tokens"])
    np.testing.assert_array_equal(
        np.asarray(again(tokens, train=False)[0]), np.asarray(model(tokens, train=False)[0])
    )


# --- what a bad checkpoint gets --------------------------------------------------------------


def _copy(checkpoints: Path, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoints / name, tmp_path / name))


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_unsupported_architecture_names_the_supported_ones(checkpoints, tmp_path):
    directory = _copy(checkpoints, "llama", tmp_path)
    _edit_config(directory, model_type="gpt2")
    with pytest.raises(UserError, match=r"model_type 'gpt2' is not supported.*deepseek_v3"):
        from_hf(directory)


def test_missing_shard_is_named(checkpoints, tmp_path):
    directory = _copy(checkpoints, "mixtral", tmp_path)
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(UserError, match=rf"shard {shard.name} named by .* is missing"):
        from_hf(directory)


def test_pickled_weights_are_refused_with_the_conversion(tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(UserError, match=r"safetensors only.*save_pretrained"):
        from_hf(directory)


def test_shape_mismatch_names_the_tensor_and_the_expected_shape(checkpoints, tmp_path):
    directory = _copy(checkpoints, "llama", tmp_path)
    _edit_config(directory, num_key_value_heads=4)
    with pytest.raises(UserError, match=r"k_proj.weight' has shape \(32, 64\).*\(64, 64\)"):
        from_hf(directory)


def test_a_tensor_the_config_does_not_use_is_an_error(checkpoints, tmp_path):
    """A bias the config says is absent would otherwise be dropped silently."""
    directory = _copy(checkpoints, "llama_tied", tmp_path)
    _edit_config(directory, attention_bias=False)
    with pytest.raises(UserError, match=r"proj.bias' is not used"):
        from_hf(directory)


def test_unsupported_option_is_named(checkpoints, tmp_path):
    directory = _copy(checkpoints, "olmoe", tmp_path)
    _edit_config(directory, clip_qkv=8.0)
    with pytest.raises(UserError, match=r"'clip_qkv' is 8.0"):
        from_hf(directory)


def test_load_onto_a_mesh_places_each_parameter_with_its_sharding(checkpoints):
    """8 devices (data 2, fsdp 2, tensor 2): every parameter arrives with the sharding of its
    logical axes, and the logits are those of the one-device load."""
    import jax

    from moejax.parallel.sharding import logical_to_mesh, make_mesh

    mesh = make_mesh({"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}, jax.devices()[:8])
    model, _ = from_hf(checkpoints / "qwen3_moe", mesh=mesh)
    w_q = model.blocks[0].attention.w_q
    assert w_q[...].sharding.spec == logical_to_mesh(("embed", "heads", "head_dim"), mesh)
    assert w_q[...].addressable_shards[0].data.shape[1] == w_q[...].shape[1] // 2
    tokens = jnp.tile(jnp.asarray(_reference(checkpoints, "qwen3_moe")["tokens"]), (2, 1))
    alone, _ = from_hf(checkpoints / "qwen3_moe")
    with jax.set_mesh(mesh):
        on_mesh = np.asarray(model(tokens, train=False)[0])
    np.testing.assert_allclose(on_mesh, np.asarray(alone(tokens, train=False)[0]), atol=1e-5)
