"""RoMA: router-only fine-tuning that pulls each sample's routing towards its successful
neighbours'.

Routing Manifold Alignment Improves Generalization of Mixture-of-Experts LLMs. Only the routers
move; besides the task loss, a manifold regulariser pulls each sample's routing weights towards
those of its "successful neighbours": the training samples the model answers correctly that lie
closest to it in a task-embedding space.

What the pieces here are in our proxy:

- Routing weights (`routing_signature`): per MoE layer, the sample's router probabilities
  averaged over its tokens, the layers side by side: `[layers * experts]`, a point on the
  routing manifold.
- Task embedding (`task_embedding`): the feed-forward input of the first block (the output of
  its `ffn_norm`) averaged over the sample's prompt positions. It is the hidden state the first
  router reads, after one attention layer has mixed the task token into every position, and no
  router acts before it, so router-only fine-tuning never moves it: the neighbours found once
  stay neighbours, as with the paper's separate frozen embedding model. The mean of the raw token
  embeddings would be frozen too, but in a prompt of random content tokens the single task token
  is a small part of it, and neighbours would be found by shared content rather than by task.
- Success: every answer position (the batch's `loss_mask`) predicted correctly by argmax.
- Neighbours (`successful_neighbours`): the `k` successful samples of highest cosine similarity,
  never the sample itself; weights (`neighbour_weights`): those similarities, clipped at zero
  and normalised to sum to one.

`fit_roma` finds success, neighbours and the neighbours' signatures once, in a reference pass
over all its training batches with the trained routers, before the first step; the neighbours'
signatures are then fixed targets (no gradient flows into them). Success is thus judged by the
model being fine-tuned, as the paper judges its training samples, and the targets cannot drift
with the routers they regularise. Every pass runs the model in evaluation mode (no routing
noise, no router-state updates), so all the fit changes are the `router` parameters.

A training driver over a built model, so it lives in `training/`; `moejax.tasks.routing_tasks`
is the synthetic multi-task experiment that drives it and `benchmarks/roma.py` its long run.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moejax.errors import require
from moejax.models.moe_layer import MoELayer, RouterContext


def _is_router(path: tuple, _value: object) -> bool:
    return tuple(path[-2:]) == ("ffn", "router")


# The variables RoMA fits: the linear map `[d_model, experts]` of every MoE layer's router.
ROUTER_PARAMS = nnx.All(nnx.Param, _is_router)


@dataclasses.dataclass(frozen=True)
class RomaOptions:
    """Adam on the routers for `steps` steps at `learning_rate`; the loss is the masked
    cross-entropy of the answers plus `manifold_weight` times `manifold_loss` against each
    sample's `k` successful neighbours."""

    steps: int = 200
    learning_rate: float = 3e-3
    manifold_weight: float = 1.0
    k: int = 4

    def __post_init__(self) -> None:
        checks = [
            ("steps", self.steps, isinstance(self.steps, int) and self.steps >= 1, "an int >= 1"),
            ("learning_rate", self.learning_rate, self.learning_rate > 0, "a value > 0"),
            ("manifold_weight", self.manifold_weight, self.manifold_weight >= 0, "a value >= 0"),
            ("k", self.k, isinstance(self.k, int) and self.k >= 1, "an int >= 1"),
        ]
        for name, value, ok, allowed in checks:
            require(ok, f"RomaOptions.{name}", value, allowed)


@dataclasses.dataclass(frozen=True)
class RomaReference:
    """What a reference pass over `n` training samples found.

    Attributes:
      embeddings: [n, d_model] float32 task embeddings.
      success: [n] bool, every answer position predicted correctly.
      signatures: [n, layers * experts] float32 routing signatures.
      neighbours: [n, k] int32 indices of each sample's successful neighbours, nearest first.
      weights: [n, k] float32 neighbour weights, each row summing to one.
    """

    embeddings: jax.Array
    success: jax.Array
    signatures: jax.Array
    neighbours: jax.Array
    weights: jax.Array


def _moe_layers(model: nnx.Module) -> list[MoELayer]:
    """The model's MoE layers, in order. ValueError unless each has a `router` map and no block
    is a mixture-of-depths block (whose feed-forward sees a subset of the tokens)."""
    for layer, block in enumerate(model.blocks):
        require(
            not block.is_mod,
            f"model.blocks[{layer}]",
            "a mixture-of-depths block",
            "blocks whose feed-forward sees every token",
        )
    layers = [block.ffn for block in model.blocks if isinstance(block.ffn, MoELayer)]
    require(bool(layers), "model", "no MoE layer", "a model with at least one MoE layer")
    for layer in layers:
        require(
            hasattr(layer, "router"),
            "model.config.router",
            layer.spec.name,
            "a router with a linear map of the hidden states (needs 'router_logits')",
        )
    return layers


def _forward(model: nnx.Module, tokens: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    """Evaluation-mode logits `[batch, length, vocab]` of `tokens [batch, length]` and every
    block's feed-forward input `[batch, length, d_model]`."""
    forward = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)
    (logits, _), outputs = forward(tokens, train=False)
    ffn_inputs = [
        outputs["blocks"][layer]["ffn_norm"]["__call__"].get_value()[0]
        for layer in range(len(model.blocks))
    ]
    return logits, ffn_inputs


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """`values [batch, length, d]` averaged over the positions of `mask [batch, length]` (all
    when None) -> `[batch, d]`."""
    if mask is None:
        return jnp.mean(values, axis=1)
    weights = mask.astype(jnp.float32)[..., None]
    return jnp.sum(values * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


def _signature(
    model: nnx.Module, tokens: jax.Array, ffn_inputs: list[jax.Array], mask: jax.Array | None
) -> jax.Array:
    """`routing_signature` from the feed-forward inputs of a `_forward` pass."""
    moe_layers = set(map(id, _moe_layers(model)))
    per_layer = []
    for block, x in zip(model.blocks, ffn_inputs, strict=True):
        if id(block.ffn) not in moe_layers:
            continue
        routing = block.ffn.route(x, RouterContext(token_ids=tokens), train=False)
        probs = routing.router_probs.reshape(*tokens.shape, -1)  # [batch, length, experts]
        per_layer.append(_masked_mean(probs.astype(jnp.float32), mask))
    return jnp.concatenate(per_layer, axis=-1)  # [batch, layers * experts]


@nnx.jit
def routing_signature(
    model: nnx.Module, tokens: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Each sample's routing weights: per MoE layer, its router probabilities averaged over its
    tokens, the layers concatenated in order (evaluation mode).

    Routing Manifold Alignment Improves Generalization of Mixture-of-Experts LLMs (what RoMA
    aligns).

    Args:
      model: a `TransformerLM` whose MoE layers have a `router` map.
      tokens: [batch, length] int32.
      mask: optional [batch, length] bool, the positions to average over (default all).

    Returns:
      [batch, moe_layers * num_experts] float32; each layer's block sums to one.
    """
    _, ffn_inputs = _forward(model, tokens)
    return _signature(model, tokens, ffn_inputs, mask)


@nnx.jit
def task_embedding(
    model: nnx.Module, tokens: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """The space RoMA finds neighbours in: the first block's feed-forward input (its `ffn_norm`
    output, what the first router reads) averaged over the positions of `mask` (the prompt).
    No router acts before it, so fitting the routers leaves it unchanged.

    Args:
      model: a `TransformerLM`.
      tokens: [batch, length] int32.
      mask: optional [batch, length] bool, the positions to average over (default all).

    Returns:
      [batch, d_model] float32.
    """
    _, ffn_inputs = _forward(model, tokens)
    return _masked_mean(ffn_inputs[0].astype(jnp.float32), mask)


def _unit(x: jax.Array) -> jax.Array:
    """`x [..., e]` scaled to unit length along the last axis (a zero vector stays zero)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a [n, e]`, `b [m, e]` -> `[n, m]` cosine similarities (0 against a zero vector)."""
    return _unit(a) @ _unit(b).T


def successful_neighbours(embeddings: jax.Array, success: jax.Array, k: int) -> jax.Array:
    """For every sample, its `k` most cosine-similar successful samples, never itself.

    Routing Manifold Alignment Improves Generalization of Mixture-of-Experts LLMs.

    Args:
      embeddings: [n, e] task embeddings.
      success: [n] bool, which samples the model gets right.
      k: neighbours per sample, at most (successful samples - 1), so that a successful sample
        has k others.

    Returns:
      [n, k] int32 indices into the n samples, most similar first.
    """
    require(embeddings.ndim == 2, "embeddings", f"shape {embeddings.shape}", "[n, e]")
    n = embeddings.shape[0]
    require(success.shape == (n,), "success", f"shape {success.shape}", f"[n] = [{n}]")
    successful = int(jnp.sum(success))
    require(
        isinstance(k, int) and 1 <= k <= successful - 1,
        "k",
        k,
        f"an int in [1, successful samples - 1 = {successful - 1}]",
    )
    similarity = cosine_similarity(embeddings, embeddings)  # [n, n]
    candidate = success[None, :] & ~jnp.eye(n, dtype=bool)
    similarity = jnp.where(candidate, similarity, -jnp.inf)
    return jax.lax.top_k(similarity, k)[1].astype(jnp.int32)


def neighbour_weights(embeddings: jax.Array, neighbours: jax.Array) -> jax.Array:
    """Each sample's weight on each of its neighbours: the cosine similarity, clipped at zero
    and normalised over the row (uniform when all are zero).

    Args:
      embeddings: [n, e].
      neighbours: [n, k] int indices from `successful_neighbours`.

    Returns:
      [n, k] float32, rows summing to one.
    """
    unit = _unit(embeddings)  # [n, e]
    similarity = jnp.einsum("ne,nke->nk", unit, unit[neighbours])  # [n, k]
    clipped = jnp.maximum(similarity, 0.0)
    total = jnp.sum(clipped, axis=1, keepdims=True)
    uniform = jnp.full_like(clipped, 1.0 / neighbours.shape[1])
    return jnp.where(total > 0, clipped / jnp.maximum(total, 1e-12), uniform)


def manifold_loss(
    signatures: jax.Array, neighbour_signatures: jax.Array, weights: jax.Array
) -> jax.Array:
    """RoMA's manifold regulariser: the weighted squared distance of each sample's routing
    weights to its neighbours', averaged over the batch.

    Routing Manifold Alignment Improves Generalization of Mixture-of-Experts LLMs.

    Args:
      signatures: [batch, layers * experts] the samples' routing signatures.
      neighbour_signatures: [batch, k, layers * experts] their neighbours'.
      weights: [batch, k] each neighbour's weight.

    Returns:
      Scalar float32: mean over the batch of sum_j weights[b, j] * |s_b - n_bj|^2.
    """
    difference = signatures[:, None, :].astype(jnp.float32) - neighbour_signatures
    squared = jnp.sum(difference**2, axis=-1)  # [batch, k]
    return jnp.mean(jnp.sum(weights.astype(jnp.float32) * squared, axis=-1))


def answer_loss(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean cross-entropy (nats) over the answer positions: `logits [batch, length, vocab]`,
    `targets`, `loss_mask [batch, length]` -> scalar."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def answer_correct(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """`[batch]` bool: every answer position's argmax equals its target."""
    wrong = (jnp.argmax(logits, axis=-1) != targets) & loss_mask
    return ~jnp.any(wrong, axis=-1)


def _batch_arrays(batch: dict) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(inputs, targets, loss_mask, prompt_mask) of a batch; the masks default to all True."""
    inputs = jnp.asarray(batch["inputs"], jnp.int32)
    full = jnp.ones(inputs.shape, bool)
    return (
        inputs,
        jnp.asarray(batch["targets"], jnp.int32),
        jnp.asarray(batch.get("loss_mask", full), bool),
        jnp.asarray(batch.get("prompt_mask", full), bool),
    )


@nnx.jit
def _measure(model, inputs, targets, loss_mask, prompt_mask):
    """(task embeddings `[batch, d_model]`, success `[batch]`, signatures `[batch, L*E]`)."""
    logits, ffn_inputs = _forward(model, inputs)
    embeddings = _masked_mean(ffn_inputs[0].astype(jnp.float32), prompt_mask)
    signatures = _signature(model, inputs, ffn_inputs, None)
    return embeddings, answer_correct(logits, targets, loss_mask), signatures


def reference_pass(model: nnx.Module, batches: list[dict], k: int) -> RomaReference:
    """Embeddings, success, signatures and successful neighbours of the samples of `batches`
    (dicts of `inputs`, `targets` and optional `loss_mask`, `prompt_mask`, `[batch, length]`),
    in batch order, under the model's current routers."""
    _moe_layers(model)
    parts = [_measure(model, *_batch_arrays(batch)) for batch in batches]
    embeddings, success, signatures = (jnp.concatenate(p) for p in zip(*parts, strict=True))
    neighbours = successful_neighbours(embeddings, success, k)
    return RomaReference(
        embeddings, success, signatures, neighbours, neighbour_weights(embeddings, neighbours)
    )


# Adam without its learning rate, which `_fit_step` applies: the rate and the manifold weight are
# traced arguments, so fits with different options share one compiled step.
_ADAM = optax.scale_by_adam()


@functools.partial(jax.jit, static_argnums=0)
def _fit_step(
    graphdef,
    router_params,
    opt_state,
    rest,
    inputs,
    targets,
    loss_mask,
    neighbour_signatures,
    weights,
    learning_rate,
    manifold_weight,
):
    """One Adam step on the routers: (params, opt_state, loss, task loss, manifold loss)."""

    def loss_fn(params):
        m = nnx.merge(graphdef, params, rest)
        logits, ffn_inputs = _forward(m, inputs)
        task = answer_loss(logits, targets, loss_mask)
        signatures = _signature(m, inputs, ffn_inputs, None)
        manifold = manifold_loss(signatures, neighbour_signatures, weights)
        return task + manifold_weight * manifold, (task, manifold)

    (loss, (task, manifold)), grads = jax.value_and_grad(loss_fn, has_aux=True)(router_params)
    updates, opt_state = _ADAM.update(grads, opt_state, router_params)
    updates = jax.tree.map(lambda u: -learning_rate * u, updates)
    return optax.apply_updates(router_params, updates), opt_state, loss, task, manifold


def fit_roma(
    model: nnx.Module, train_batches: Iterable[dict], options: RomaOptions
) -> list[dict[str, float]]:
    """Fine-tunes the model's routers in place with RoMA; every other variable stays as it was.

    Routing Manifold Alignment Improves Generalization of Mixture-of-Experts LLMs.

    Args:
      model: a `TransformerLM` whose MoE layers have a `router` map.
      train_batches: dicts of `inputs`, `targets` `[batch, length]` int32 and optional
        `loss_mask` (the answer positions) and `prompt_mask` (the positions the task embedding
        averages over) `[batch, length]` bool, default all positions. Cycled; all of them form
        the reference set the neighbours come from.
      options: steps, learning rate, manifold weight, k.

    Returns:
      One record per step, measured before its update: `loss` (combined), `task_loss`
      (answer cross-entropy, nats) and `manifold_loss` (unweighted, whatever the weight).
    """
    batches = list(train_batches)
    require(bool(batches), "train_batches", "empty", "at least one batch")
    arrays = [_batch_arrays(batch) for batch in batches]
    sizes = [inputs.shape[0] for inputs, *_ in arrays]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    reference = reference_pass(model, batches, options.k)
    neighbour_signatures = reference.signatures[reference.neighbours]  # [n, k, L*E]
    graphdef, router_params, rest = nnx.split(model, ROUTER_PARAMS, ...)
    opt_state = _ADAM.init(router_params)
    hyper = (jnp.float32(options.learning_rate), jnp.float32(options.manifold_weight))
    history = []
    for i in range(options.steps):
        index = i % len(batches)
        rows = slice(offsets[index], offsets[index] + sizes[index])
        router_params, opt_state, loss, task, manifold = _fit_step(
            graphdef,
            router_params,
            opt_state,
            rest,
            *arrays[index][:3],
            neighbour_signatures[rows],
            reference.weights[rows],
            *hyper,
        )
        history.append(
            {"loss": float(loss), "task_loss": float(task), "manifold_loss": float(manifold)}
        )
    nnx.update(model, router_params)
    return history


__all__ = [
    "ROUTER_PARAMS",
    "RomaOptions",
    "RomaReference",
    "answer_correct",
    "answer_loss",
    "cosine_similarity",
    "fit_roma",
    "manifold_loss",
    "neighbour_weights",
    "reference_pass",
    "routing_signature",
    "successful_neighbours",
    "task_embedding",
]


@dataclasses.dataclass(frozen=True)
class Comparison:
    """What `compare_fits` measured.

    Attributes:
      accuracy: run -> split -> `task_accuracy` dict, runs "trained", "router_only" and
        "roma", splits "test" and "finetune" (what the `accuracy` function returns).
      models: "router_only" and "roma" -> the fine-tuned copy of the model.
      histories: "router_only" and "roma" -> the `fit_roma` records.
    """

    accuracy: dict[str, dict[str, dict[str, float]]]
    models: dict[str, Any]
    histories: dict[str, list[dict[str, float]]]


def compare_fits(
    model: Any,
    finetune: list[dict],
    test: list[dict],
    options: RomaOptions,
    accuracy: Callable[[Any, list[dict]], dict[str, float]],
) -> Comparison:
    """Fine-tunes two copies of `model`'s routers on `finetune`: without the regulariser
    ("router_only", `manifold_weight` 0) and with `options.manifold_weight` ("roma"); measures
    `accuracy(model, batches)` of `model` and both copies on both splits. `model` is left as it
    was."""
    graphdef, trained = nnx.split(model)
    models = {"trained": model}
    histories = {}
    for name, weight in (("router_only", 0.0), ("roma", options.manifold_weight)):
        models[name] = nnx.merge(graphdef, jax.tree.map(jnp.copy, trained))
        histories[name] = fit_roma(
            models[name], finetune, dataclasses.replace(options, manifold_weight=weight)
        )
    accuracy = {
        name: {"test": accuracy(m, test), "finetune": accuracy(m, finetune)}
        for name, m in models.items()
    }
    del models["trained"]
    return Comparison(accuracy, models, histories)
