"""Byte generation: greedy decoding equals step-by-step argmax of the full forward pass."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import load_config_file
from moejax.models.transformer import TransformerLM
from moejax.sampling import generate

CONFIG = load_config_file(Path(__file__).resolve().parents[2] / "configs" / "tiny.py").model


def _model():
    model = TransformerLM(CONFIG, rngs=nnx.Rngs(3))
    graphdef, state = nnx.split(model, nnx.Param)
    return model, (lambda params: nnx.merge(graphdef, params)), nnx.to_pure_dict(state)


def test_greedy_generation_matches_argmax_of_forward():
    _, build, params = _model()
    prompt = b"To be"
    out = generate(build, params, prompt, num_bytes=4, window=8, temperature=0.0)
    assert out[: len(prompt)] == prompt and len(out) == len(prompt) + 4
    # The full forward pass on the unpadded context, jitted: each of its four lengths compiles
    # once instead of op by op.
    forward = jax.jit(lambda params, tokens: build(params)(tokens)[0])
    text = list(prompt)
    for _ in range(4):
        logits = forward(params, jnp.asarray([text[-8:]], jnp.int32))
        text.append(int(np.argmax(logits[0, -1])))
    assert out == bytes(text)


def test_sampling_is_seeded_and_rejects_bad_input():
    _, build, params = _model()
    first = generate(build, params, b"A", num_bytes=5, window=8, seed=1)
    assert first == generate(build, params, b"A", num_bytes=5, window=8, seed=1)
    with pytest.raises(ValueError, match="prompt"):
        generate(build, params, b"", num_bytes=1, window=8)
    with pytest.raises(ValueError, match="temperature"):
        generate(build, params, b"A", num_bytes=1, window=8, temperature=-1.0)
