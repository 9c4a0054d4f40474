"""Training from a Hugging Face checkpoint (`train.init_from_hf`, `train.py --init_from_hf`) and
perplexity of one on a text file (`eval.py --hf`).

The checkpoint is a tiny OLMoE written by `to_hf` with a 256-token vocabulary, so the byte corpus
fits it; that `to_hf` writes what `transformers` reads is `test_from_hf`'s business.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config as config_lib
from moejax.config import RouterConfig
from moejax.models.transformer import TransformerLM
from moejax.pretrained import config_from_hf, from_hf, to_hf
from moejax.pretrained.text import sliding_window_perplexity
from moejax.training.loop import train
from moejax.training.restore import restore_run
from tests.pretrained.reference import shared_checkpoints

ROOT = Path(__file__).resolve().parents[2]
OLMOE = {
    "model_type": "olmoe",
    "vocab_size": 256,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 32,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    config, _, _ = config_from_hf(OLMOE)
    model = TransformerLM(config, rngs=nnx.Rngs(3))
    return to_hf(model, tmp_path_factory.mktemp("olmoe") / "hf", model_type="olmoe")


def _run_config(tiny_config, checkpoint: Path, *overrides: str) -> config_lib.Config:
    config = tiny_config("train.steps=2", "train.warmup_steps=0", *overrides)
    pretrained, _, _ = config_from_hf(checkpoint)
    train_config = dataclasses.replace(config.train, init_from_hf=str(checkpoint))
    return dataclasses.replace(config, model=pretrained, train=train_config)


def test_a_run_starts_from_the_checkpoint_weights(tiny_config, checkpoint, tmp_path):
    """With a learning rate of ~0 the trained weights are the checkpoint's (a random init with
    the run's seed is far from them)."""
    loaded, config_hf = from_hf(checkpoint)
    expected = np.asarray(loaded.blocks[0].ffn.w_gate[...])
    config = _run_config(tiny_config, checkpoint, "train.learning_rate=1e-12")
    train(config, tmp_path / "run", devices=jax.devices()[:1], progress=False)
    trained = restore_run(tmp_path / "run")[2]["params"]
    np.testing.assert_allclose(trained["blocks"][0]["ffn"]["w_gate"], expected, atol=1e-6)
    random = TransformerLM(config_hf, rngs=nnx.Rngs(config.train.seed)).blocks[0].ffn.w_gate
    assert np.abs(np.asarray(random[...]) - expected).max() > 0.1


def test_a_changed_router_keeps_the_checkpoint_weights_it_can_use(
    tiny_config, checkpoint, tmp_path
):
    """bias_balanced reads the same router weights and adds a state the checkpoint lacks."""
    loaded, _ = from_hf(checkpoint)
    config = _run_config(tiny_config, checkpoint, "train.learning_rate=1e-12")
    model = dataclasses.replace(config.model, router=RouterConfig.of("bias_balanced"))
    config = dataclasses.replace(config, model=model)
    train(config, tmp_path / "run", devices=jax.devices()[:1], progress=False)
    variables = restore_run(tmp_path / "run")[2]
    router = variables["params"]["blocks"][0]["ffn"]["router"]
    np.testing.assert_allclose(router, np.asarray(loaded.blocks[0].ffn.router[...]), atol=1e-6)
    assert variables["router_state"]["blocks"][0]["ffn"]["router_state"].shape == (4,)


def test_train_py_takes_the_model_and_tokenizer_from_the_checkpoint(build_once, data_dir, tmp_path):
    """The transformers-built OLMoE (vocabulary 128, its own tokenizer.json): the run trains
    on the corpus's token ids, and a --config override applies on top."""
    checkpoint = shared_checkpoints(build_once) / "olmoe"
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        str(ROOT / "configs" / "tiny.py"),
        "--workdir",
        str(workdir),
        "--init_from_hf",
        str(checkpoint),
        "--no-progress",
        f"--config.data.data_dir={data_dir}",
        "--config.train.steps=2",
        "--config.train.warmup_steps=0",
        "--config.model.moe.top_k=1",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bits/token" in done.stderr + done.stdout
    recorded = config_lib.load_json(workdir / "config.json")
    assert recorded.train.init_from_hf == str(checkpoint)
    assert recorded.data.tokenizer == str(checkpoint)
    assert (recorded.model.vocab_size, recorded.model.qk_norm) == (128, "across_heads")
    assert recorded.model.moe.top_k == 1  # the override applies on top of the checkpoint's


def test_tokenized_rows_are_the_tokenizer_ids_of_the_documents(build_once, data_dir):
    """Validation rows with data.tokenizer: the documents' token ids, concatenated and cut."""
    from moejax.data import make_eval_batches
    from moejax.data.shakespeare import data_source
    from moejax.pretrained.text import load_tokenizer

    checkpoint = shared_checkpoints(build_once) / "olmoe"
    tokenizer = load_tokenizer(checkpoint)
    source = data_source(data_dir, "validation")
    ids = []
    for i in range(3):
        text = bytes(source[i]["bytes"]).decode("utf-8", errors="replace")
        ids += tokenizer.encode(text, add_special_tokens=False).ids
    batch = make_eval_batches(
        data_dir, seq_len=16, batch_size=2, max_batches=1, tokenizer=str(checkpoint)
    )[0]
    np.testing.assert_array_equal(batch["inputs"][0], ids[:16])
    np.testing.assert_array_equal(batch["targets"][0], ids[1:17])
    np.testing.assert_array_equal(batch["inputs"][1], ids[17:33])


def test_sliding_window_perplexity_scores_each_token_once_with_its_context(checkpoint):
    """Against a brute-force loop: every token t >= 1 scored by the window that first covers
    it, with the context that window gives it."""
    model, _ = from_hf(checkpoint)
    tokens = np.random.default_rng(0).integers(0, 256, 50).astype(np.int32)
    window, stride = 16, 6
    result = sliding_window_perplexity(model, tokens, window=window, stride=stride, batch_size=3)
    total, scored_until, begin = 0.0, 1, 0
    while scored_until < len(tokens):
        end = min(begin + window, len(tokens))
        logits, _ = model(jnp.asarray(tokens[None, begin:end]), train=False)
        log_probs = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
        for t in range(scored_until, end):
            total -= float(log_probs[t - 1 - begin, tokens[t]])
        scored_until, begin = end, begin + stride
    assert result["tokens"] == len(tokens) - 1
    np.testing.assert_allclose(result["nll"], total / (len(tokens) - 1), rtol=1e-5)


def test_eval_py_hf_reports_perplexity(build_once, tmp_path):
    """eval.py --hf on the transformers-built OLMoE with its own tokenizer.json."""
    pytest.importorskip("tokenizers")
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 4)
    hf_dir = shared_checkpoints(build_once) / "olmoe"
    command = [
        sys.executable,
        str(ROOT / "eval.py"),
        "--hf",
        str(hf_dir),
        "--text",
        str(text),
        "--window",
        "16",
        "--stride",
        "8",
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["tokens"] > 20 and 1.0 < report["perplexity"] < 1e6
