"""Byte-level text generation from a trained language model (for looking at what it learned)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def generate(
    build_model: Callable[[Any], nnx.Module],
    variables: Any,
    prompt: bytes,
    *,
    num_bytes: int,
    window: int,
    temperature: float = 0.8,
    seed: int = 0,
) -> bytes:
    """Samples `num_bytes` bytes after `prompt`, one at a time, conditioning on at most the last
    `window` bytes (the training sequence length: positions past it were never trained).

    Each step runs the model on a fixed `[1, window]` buffer, so one compilation serves all
    steps; causal attention makes the padding after the last real byte irrelevant.
    `build_model(variables)` returns the model (e.g. `ModelSpec.merge`, or
    `lambda params: nnx.merge(graphdef, params)`).
    """
    if not prompt:
        raise ValueError("prompt: must hold at least one byte")
    if temperature < 0:
        raise ValueError(f"temperature: got {temperature}; allowed: >= 0 (0 is greedy)")

    @jax.jit
    def next_byte(variables, tokens, length, key):
        logits, _ = build_model(variables)(tokens, train=False)  # [1, window, vocab]
        last = logits[0, length - 1]  # [vocab]
        if temperature == 0:
            return jnp.argmax(last)
        return jax.random.categorical(key, last / temperature)

    text = list(prompt)
    key = jax.random.key(seed)
    for _ in range(num_bytes):
        context = text[-window:]
        tokens = np.zeros((1, window), np.int32)
        tokens[0, : len(context)] = context
        key, step_key = jax.random.split(key)
        text.append(int(next_byte(variables, tokens, len(context), step_key)))
    return bytes(text)
