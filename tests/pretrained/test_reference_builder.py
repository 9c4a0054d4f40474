"""The tiny Hugging Face checkpoints and transformers references that the loader tests read."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.pretrained.reference import (
    ARCHITECTURES,
    reference_decode,
    reference_logits,
    shared_checkpoints,
    summary,
)

VOCAB_SIZE = 128


@pytest.fixture(scope="module")
def checkpoints(build_once) -> Path:
    return shared_checkpoints(build_once)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_checkpoint_has_config_weights_tokenizer_and_reference(checkpoints, name):
    model_dir = checkpoints / name
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json", "reference.npz"):
        assert (model_dir / file).is_file(), file
    assert list(model_dir.glob("*.safetensors"))
    assert json.loads((model_dir / "config.json").read_text())["vocab_size"] == VOCAB_SIZE
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert 0 < len(vocab) <= VOCAB_SIZE


def test_mixtral_is_sharded_with_an_index(checkpoints):
    model_dir = checkpoints / "mixtral"
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert shards == {path.name for path in model_dir.glob("*.safetensors")}


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_reference_arrays_have_the_documented_shapes(checkpoints, name):
    with np.load(checkpoints / name / "reference.npz") as ref:
        shapes = {key: (ref[key].shape, ref[key].dtype) for key in ref.files}
    assert shapes == {
        "tokens": ((2, 12), np.int32),
        "logits": ((2, 12, VOCAB_SIZE), np.float32),
        "logits_bf16": ((2, 12, VOCAB_SIZE), np.float32),
        "decode_prompt": ((2, 8), np.int32),
        "decode_tokens": ((2, 16), np.int32),
        "decode_logits": ((2, 16, VOCAB_SIZE), np.float32),
    }


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_logits_are_finite_and_spread(checkpoints, name):
    # The weights are drawn at a scale where a dropped norm or a mis-laid projection shows; at
    # HF's init (std 0.02) the logits are nearly flat.
    with np.load(checkpoints / name / "reference.npz") as ref:
        for key in ("logits", "logits_bf16", "decode_logits"):
            assert np.isfinite(ref[key]).all(), key
            assert ref[key].std() > 0.1, key
        # bfloat16 moves most logits a little; a routing flip may move a few a lot.
        assert np.median(np.abs(ref["logits_bf16"] - ref["logits"])) < 0.1 * ref["logits"].std()


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_greedy_tokens_are_the_argmax_of_their_logits(checkpoints, name):
    with np.load(checkpoints / name / "reference.npz") as ref:
        np.testing.assert_array_equal(ref["decode_logits"].argmax(-1), ref["decode_tokens"])


def test_summary_lists_the_saved_tensors(checkpoints):
    llama = summary(checkpoints)["llama"]
    assert llama["tensors"]["model.embed_tokens.weight"] == [VOCAB_SIZE, 64]
    assert "lm_head.weight" not in summary(checkpoints)["llama_tied"]["tensors"]


def test_cached_decode_matches_prefill_of_the_decoded_sequence(checkpoints):
    # DeepSeek's latent-attention cache is the one most likely to go astray; its decode logits
    # must equal the prefill logits of prompt + generated tokens, through the `logits` command.
    model_dir = checkpoints / "deepseek_v3"
    with np.load(model_dir / "reference.npz") as ref:
        prompt, tokens = ref["decode_prompt"], ref["decode_tokens"]
        decode_logits = ref["decode_logits"]
    sequence = np.concatenate([prompt, tokens[:, :-1]], axis=1)  # [2, 8 + 15]
    prefill = reference_logits(model_dir, sequence)
    np.testing.assert_allclose(prefill[:, prompt.shape[1] - 1 :], decode_logits, atol=1e-4)


def test_decode_command_reproduces_the_stored_decode(checkpoints):
    model_dir = checkpoints / "mixtral"  # read back from its shards
    with np.load(model_dir / "reference.npz") as ref:
        tokens, logits = reference_decode(model_dir, ref["decode_prompt"], 16)
        np.testing.assert_array_equal(tokens, ref["decode_tokens"])
        np.testing.assert_allclose(logits, ref["decode_logits"], atol=1e-5)
