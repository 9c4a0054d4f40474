"""Token generation with a key/value cache: greedy, temperature and top-p sampling for a batch
of prompts of different lengths, stopping at stop tokens.

The prompts are right-padded to one length and run once (the prefill), which writes every
position's keys and values into the cache (`TransformerLM.decode`); then each step runs only the
newest token of every sequence, at that sequence's own position. A padded slot past a prompt's
end is masked until its sequence's next token overwrites it, so sequences of different lengths
share one compiled prefill and one compiled step. The cache is donated to each step, so it is
updated in place.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.errors import require
from moejax.models.transformer import TransformerLM


@dataclasses.dataclass(frozen=True)
class Generated:
    """What `generate` returns.

    Attributes:
      tokens: per prompt, the generated tokens (stop token included, when one ended it).
      logits: `[batch, steps, vocab]` float32 (steps <= max_new_tokens: fewer when every
        sequence stopped early), the logits each new token was drawn
        from (rows past a sequence's end are those of the padding it kept running on).
      prefill_seconds, decode_seconds: wall time of the prefill and of the decode steps
        (compilation included on a first call).
    """

    tokens: list[list[int]]
    logits: np.ndarray
    prefill_seconds: float
    decode_seconds: float


def sample_next(
    logits: jax.Array, key: jax.Array, *, temperature: float, top_p: float
) -> jax.Array:
    """Next tokens `[batch]` from `logits [batch, vocab]`: the argmax when `temperature` is 0,
    else a draw from softmax(logits / temperature) restricted to the smallest set of tokens
    whose probability reaches `top_p` (nucleus sampling, Holtzman et al. 2020)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        probs = jax.nn.softmax(scaled, axis=-1)
        sorted_probs = jnp.sort(probs, axis=-1)[:, ::-1]
        # A token stays when the tokens more probable than it hold less than top_p.
        before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        threshold = jnp.min(jnp.where(before < top_p, sorted_probs, jnp.inf), axis=-1)
        scaled = jnp.where(probs >= threshold[:, None], scaled, -jnp.inf)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


# Compiled once per model structure and sampling settings, shared by every `generate` call.
@functools.partial(jax.jit, static_argnums=(0,))
def _prefill(graphdef, state, tokens, cache):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return nnx.merge(graphdef, state).decode(tokens, positions, cache)


@functools.partial(jax.jit, static_argnames=("temperature", "top_p"))
def _first_token(logits, lengths, key, *, temperature, top_p):
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return sample_next(last, key, temperature=temperature, top_p=top_p), last


# The cache is donated: each step updates it in place instead of copying it.
@functools.partial(
    jax.jit, static_argnums=(0,), static_argnames=("temperature", "top_p"), donate_argnums=(4,)
)
def _step(graphdef, state, token, position, cache, key, *, temperature, top_p):
    logits, cache = nnx.merge(graphdef, state).decode(token[:, None], position[:, None], cache)
    last = logits[:, 0]
    return sample_next(last, key, temperature=temperature, top_p=top_p), last, cache


def generate(
    model: TransformerLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop_tokens: Sequence[int] = (),
    seed: int = 0,
    pad_id: int = 0,
) -> Generated:
    """Continues each prompt by up to `max_new_tokens` tokens (see the module docstring).

    Args:
      model: a `TransformerLM` whose blocks can decode (`init_cache` says why not).
      prompts: token ids, one non-empty sequence per batch row, of any lengths.
      temperature: 0 for greedy decoding, else the sampling temperature.
      top_p: nucleus sampling mass in (0, 1]; 1 samples from the whole distribution.
      stop_tokens: a sequence ends after producing one of these.
      seed: the sampling key's seed.
      pad_id: the token that fills prompts up to the longest (never attended to).
    """
    require(len(prompts) > 0, "generate prompts", prompts, "at least one prompt")
    lengths = np.array([len(p) for p in prompts], np.int32)
    require(lengths.min() > 0, "generate prompts", list(lengths), "non-empty token sequences")
    require(max_new_tokens > 0, "generate max_new_tokens", max_new_tokens, "an int > 0")
    require(temperature >= 0, "generate temperature", temperature, ">= 0 (0: greedy)")
    require(0 < top_p <= 1, "generate top_p", top_p, "in (0, 1]")
    batch, prompt_len = len(prompts), int(lengths.max())
    total = prompt_len + max_new_tokens
    require(
        total <= model.config.max_seq_len,
        "generate max_new_tokens",
        max_new_tokens,
        f"<= model.max_seq_len - longest prompt = {model.config.max_seq_len - prompt_len}",
    )
    tokens = np.full((batch, prompt_len), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = prompt
    graphdef, state = nnx.split(model)
    cache = model.init_cache(batch, total)
    sampling = {"temperature": float(temperature), "top_p": float(top_p)}
    key = jax.random.key(seed)
    start = time.perf_counter()
    logits, cache = _prefill(graphdef, state, jnp.asarray(tokens), cache)
    key, subkey = jax.random.split(key)
    token, last = _first_token(logits, jnp.asarray(lengths), subkey, **sampling)
    token.block_until_ready()
    prefill_seconds = time.perf_counter() - start
    stops = set(int(t) for t in stop_tokens)
    produced = [[] for _ in range(batch)]
    done = np.zeros(batch, bool)
    step_logits = [last]
    position = jnp.asarray(lengths)
    start = time.perf_counter()
    for i in range(max_new_tokens):
        chosen = np.asarray(token)
        for row in np.flatnonzero(~done):
            produced[row].append(int(chosen[row]))
            done[row] = int(chosen[row]) in stops
        if done.all() or i == max_new_tokens - 1:
            break
        key, subkey = jax.random.split(key)
        token, last, cache = _step(graphdef, state, token, position, cache, subkey, **sampling)
        step_logits.append(last)
        position = position + 1
    logits_out = np.stack([np.asarray(x) for x in step_logits], axis=1)
    return Generated(produced, logits_out, prefill_seconds, time.perf_counter() - start)
