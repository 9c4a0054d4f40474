"""Rewiring Experts on the Fly: test-time offsets on the router logits, fitted on the text.

*Rewiring Experts on the Fly* adapts a trained MoE language model to one input without data or
labels: an additive vector on the router logits of selected MoE layers is optimised by
self-supervision, the next-token loss of the text the model has already read or written, once
at prefill (on the prompt) and again at intervals while it generates. Only these vectors move;
the weights stay frozen, so the adaptation changes which experts a token reaches, not what they
compute. The loss reaches an offset only through the combine weights of the chosen experts: a
top-1 router whose weight is renormalized to 1 gives it no gradient (Adam then moves it by
rounding noise), so rewire top-k >= 2 or unnormalized routers.

Here each chosen MoE block's layer carries a `RouterLogitOffset` (`[experts]` float32, see
`moejax.models.moe_layer`), added to every token's logits; `fit_logit_offsets` runs Adam on the
offsets alone for the mean next-token negative log-likelihood of `tokens`, and
`generate_rewired` alternates fitting and greedy decoding with `moejax.generation.generate`.

A refit changes the routing of every position already in the cache, so the keys and values
cached before it are stale. `generate_rewired` therefore decodes in chunks of `refit_every`
tokens, and each chunk re-prefills the whole text so far under the current offsets (one
`generate` call per chunk). This costs a prefill per refit and a compilation per distinct text
length, and makes every token the greedy choice of the model with the offsets of its chunk.

It fits during generation, so it sits above both `moejax.training` (the loss) and
`moejax.generation` (the decoding), on the floor of `moejax.compress`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moejax.errors import require
from moejax.generation import generate
from moejax.models.moe_layer import RouterLogitOffset
from moejax.models.transformer import TransformerLM
from moejax.training.step import cross_entropy

# The attribute of a `MoELayer` that holds its offset; the layer's "router_logits" provider
# reads it under this name.
OFFSET_ATTRIBUTE = "logit_offset"


@dataclasses.dataclass(frozen=True)
class Refit:
    """One fit of `generate_rewired`.

    Attributes:
      length: tokens of the text it was fitted on (the prompt, then the prompt and the tokens
        generated so far).
      nll: the text's mean next-token negative log-likelihood (nats) before each step and after
        the last (`steps + 1` values).
    """

    length: int
    nll: list[float]


@dataclasses.dataclass(frozen=True)
class RewiredGeneration:
    """What `generate_rewired` returns.

    Attributes:
      tokens: the generated tokens (the stop token included, when one ended the text).
      refits: every fit, in order, the prefill's first.
      offsets: MoE block index -> its final offset `[experts]` float32.
    """

    tokens: list[int]
    refits: list[Refit]
    offsets: dict[int, np.ndarray]


def moe_blocks(model: TransformerLM) -> list[int]:
    """The indices of the model's MoE blocks."""
    return [i for i, block in enumerate(model.blocks) if block.is_moe]


def attached_layers(model: TransformerLM) -> list[int]:
    """The indices of the blocks whose MoE layer carries an offset."""
    return [i for i in moe_blocks(model) if hasattr(model.blocks[i].ffn, OFFSET_ATTRIBUTE)]


def logit_offsets(model: TransformerLM) -> dict[int, np.ndarray]:
    """Block index -> a copy of its offset `[experts]` float32, for every attached block."""
    return {
        i: np.asarray(getattr(model.blocks[i].ffn, OFFSET_ATTRIBUTE)[...])
        for i in attached_layers(model)
    }


def _chosen_layers(model: TransformerLM, layers: Sequence[int] | None, field: str) -> list[int]:
    """`layers` (None: every MoE block) checked: distinct MoE block indices whose router reads
    "router_logits"; a ValueError naming `field`, or the block and its router, otherwise."""
    available = moe_blocks(model)
    chosen = available if layers is None else list(layers)
    require(
        len(chosen) > 0 and len(set(chosen)) == len(chosen) and set(chosen) <= set(available),
        field,
        layers,
        f"distinct MoE block indices among {available}",
    )
    for i in chosen:
        spec = model.blocks[i].ffn.spec
        require(
            "router_logits" in spec.needs,
            f"{field}: block {i} router {spec.name!r} needs",
            list(spec.needs),
            "a router that reads 'router_logits' (the offset is added to them)",
        )
    return chosen


def attach_logit_offsets(model: TransformerLM, layers: Sequence[int] | None = None) -> list[int]:
    """Gives the MoE layers of blocks `layers` (None: every MoE block) a zero offset, replacing
    any offset they had; returns the blocks. A zero offset leaves the model's outputs exactly
    as they were. ValueError, before anything is attached, for an index that is no MoE block
    or a block whose router does not read "router_logits" (naming the router)."""
    chosen = _chosen_layers(model, layers, "attach_logit_offsets layers")
    for i in chosen:
        ffn = model.blocks[i].ffn
        offset = RouterLogitOffset(jnp.zeros((ffn.num_experts,), jnp.float32))
        setattr(ffn, OFFSET_ATTRIBUTE, offset)
    return chosen


def detach_logit_offsets(model: TransformerLM) -> list[int]:
    """Removes every offset, restoring the model's structure and behaviour; returns the blocks
    that had one."""
    attached = attached_layers(model)
    for i in attached:
        delattr(model.blocks[i].ffn, OFFSET_ATTRIBUTE)
    return attached


def next_token_nll(model: TransformerLM, tokens: jax.Array) -> jax.Array:
    """Mean next-token negative log-likelihood (nats) of `tokens [batch, length]` under the
    model in evaluation mode: position t predicts token t + 1."""
    logits, _ = model(tokens, train=False)  # [batch, length, vocab]
    total, count = cross_entropy(logits[:, :-1], tokens[:, 1:])
    return total / count


# Adam's moment estimates; the learning rate scales its output in `_step`, so one compiled step
# serves every learning rate.
_ADAM = optax.scale_by_adam()


def _offsets_nll(graphdef, offsets, rest, tokens):
    return next_token_nll(nnx.merge(graphdef, offsets, rest), tokens)


# Both compiled once per model structure and text shape.
_nll = jax.jit(_offsets_nll, static_argnums=(0,))


@functools.partial(jax.jit, static_argnums=(0,))
def _step(graphdef, offsets, adam_state, rest, tokens, learning_rate):
    # Only `offsets` is differentiated: the weights in `rest` are constants of the step.
    loss, grads = jax.value_and_grad(_offsets_nll, argnums=1)(graphdef, offsets, rest, tokens)
    directions, adam_state = _ADAM.update(grads, adam_state, offsets)
    offsets = jax.tree.map(lambda o, d: o - learning_rate * d, offsets, directions)
    return offsets, adam_state, loss


def fit_logit_offsets(
    model: TransformerLM,
    tokens: jax.Array | np.ndarray,
    *,
    steps: int,
    learning_rate: float,
    layers: Sequence[int] | None = None,
) -> list[float]:
    """Fits the router-logit offsets of blocks `layers` in place by `steps` steps of Adam on the
    mean next-token negative log-likelihood of `tokens [batch, length]` int32 (Rewiring Experts
    on the Fly); every other variable, other blocks' offsets included, stays as it is.

    `layers` None fits every attached offset, or attaches zero offsets to every MoE block when
    none is attached; a chosen block without an offset gets a zero one first. Each call starts a
    fresh Adam state from the current offsets. Returns the NLL (nats) before each step and after
    the last: `steps + 1` values.
    """
    require(isinstance(steps, int) and steps >= 0, "fit_logit_offsets steps", steps, "an int >= 0")
    require(learning_rate > 0, "fit_logit_offsets learning_rate", learning_rate, "a number > 0")
    tokens = jnp.asarray(tokens)
    require(
        tokens.ndim == 2
        and jnp.issubdtype(tokens.dtype, jnp.integer)
        and 2 <= tokens.shape[1] <= model.config.max_seq_len,
        "fit_logit_offsets tokens",
        f"shape {tuple(tokens.shape)}, dtype {tokens.dtype}",
        f"int [batch, length] with 2 <= length <= max_seq_len={model.config.max_seq_len}",
    )
    if layers is None and attached_layers(model):
        chosen = attached_layers(model)
    else:
        chosen = _chosen_layers(model, layers, "fit_logit_offsets layers")
        missing = [i for i in chosen if i not in attached_layers(model)]
        if missing:
            attach_logit_offsets(model, missing)

    def is_fitted(path, value) -> bool:
        # Paths read ("blocks", block index, "ffn", OFFSET_ATTRIBUTE).
        return isinstance(value, RouterLogitOffset) and path[1] in chosen

    graphdef, offsets, rest = nnx.split(model, is_fitted, ...)
    tokens, learning_rate = tokens.astype(jnp.int32), jnp.float32(learning_rate)
    adam_state, history = _ADAM.init(offsets), []
    for _ in range(steps):
        offsets, adam_state, loss = _step(
            graphdef, offsets, adam_state, rest, tokens, learning_rate
        )
        history.append(float(loss))
    history.append(float(_nll(graphdef, offsets, rest, tokens)))
    nnx.update(model, offsets)
    return history


def generate_rewired(
    model: TransformerLM,
    prompt: Sequence[int],
    *,
    max_new_tokens: int,
    refit_every: int,
    steps: int,
    learning_rate: float,
    layers: Sequence[int] | None = None,
    stop_tokens: Sequence[int] = (),
) -> RewiredGeneration:
    """Greedy continuation of `prompt` by up to `max_new_tokens` tokens with router-logit
    offsets on blocks `layers` (None: every MoE block) fitted on the fly (Rewiring Experts on
    the Fly): `steps` Adam steps at `learning_rate` on the prompt before the first token, then
    again on the prompt and the generated tokens after every `refit_every` tokens. Each chunk
    of `refit_every` tokens re-prefills the whole text (module docstring).

    The offsets start at zero and are removed when it returns (the result keeps their final
    values), so `model` must carry none: ValueError otherwise. With `steps=0` the tokens are
    those of `generate(model, [prompt], max_new_tokens=max_new_tokens)`.
    """
    require(
        not attached_layers(model),
        "generate_rewired model",
        f"offsets on blocks {attached_layers(model)}",
        "a model without logit offsets (call detach_logit_offsets first)",
    )
    prompt = [int(t) for t in prompt]
    require(
        len(prompt) >= 2,
        "generate_rewired prompt",
        prompt,
        "at least 2 tokens (the prefill fit predicts each next one)",
    )
    for field, value, lowest in (
        ("max_new_tokens", max_new_tokens, 1),
        ("refit_every", refit_every, 1),
        ("steps", steps, 0),
    ):
        require(
            isinstance(value, int) and value >= lowest,
            f"generate_rewired {field}",
            value,
            f"an int >= {lowest}",
        )
    require(learning_rate > 0, "generate_rewired learning_rate", learning_rate, "a number > 0")
    room = model.config.max_seq_len - len(prompt)
    require(
        max_new_tokens <= room,
        "generate_rewired max_new_tokens",
        max_new_tokens,
        f"<= model.max_seq_len - prompt length = {room}",
    )
    chosen = attach_logit_offsets(model, layers)
    try:
        stops = {int(t) for t in stop_tokens}
        text, produced, refits = list(prompt), [], []
        while True:
            history = fit_logit_offsets(
                model,
                np.asarray([text], np.int32),
                steps=steps,
                learning_rate=learning_rate,
                layers=chosen,
            )
            refits.append(Refit(len(text), history))
            chunk = min(refit_every, max_new_tokens - len(produced))
            new = generate(model, [text], max_new_tokens=chunk, stop_tokens=stop_tokens).tokens[0]
            produced += new
            text += new
            if len(produced) == max_new_tokens or (new and new[-1] in stops):
                return RewiredGeneration(produced, refits, logit_offsets(model))
    finally:
        detach_logit_offsets(model)
