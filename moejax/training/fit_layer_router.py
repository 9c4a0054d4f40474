"""Fitting Dr.LLM layer routers on a frozen transformer LM.

Dr.LLM: Dynamic Layer Routing in LLMs supervises per-layer skip / execute / repeat routers with
execution paths that a Monte-Carlo tree search finds under a compute budget, and trains them with
a class-balanced focal loss while the LM stays frozen. Our proxy replaces the search by a
per-layer greedy one: for every layer alone we measure each sequence's loss when that layer
skips, executes or repeats while every other layer executes (`option_losses`), and label the
layer with the action of lowest `loss + compute_penalty * block applications`
(`moejax.depth.greedy_decisions`). The labels of different layers are chosen independently, so
following all of them at once (the "oracle" path) need not be as good as each one alone: the
search would account for how the layers interact, the greedy proxy does not.

Each router reads the residual stream entering its block on the all-execute path (the path its
labels were measured on). The router only sees the mean of that stream over the sequence, so the
fitting data keep just that mean, as a one-token sequence (`router_inputs`): `[num_layers,
sequences, 1, d_model]` instead of the whole stream. At evaluation a router sees the stream its
predecessors' decisions produced, which drifts from the all-execute one when they deviate.

This is a training driver (it builds on `TransformerLM` and runs an optimizer), so it lives in
`training/` beside the LM loop rather than in `moejax.depth`, whose pure routing functions the
model itself is built from and which therefore must not import the model. It is not a `tasks/`
program: it has no data, workdir or report of its own, and `benchmarks/layer_router.py` is the
experiment that drives it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moejax.depth.layer_router import (
    LAYER_DECISIONS,
    greedy_decisions,
    layer_router_logits,
    layer_router_loss,
)
from moejax.models.moe_layer import RouterContext
from moejax.models.transformer import ACTIVATION, TransformerLM
from moejax.parallel.sharding import constrain

# The variables the fit may change: every block's layer-router weights and nothing else.
ROUTER_PARAMS = nnx.All(nnx.Param, nnx.PathContains("layer_router"))
CLASS_WEIGHTINGS = ("none", "balanced")


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """How the routers are fitted (full-batch AdamW on the labelled sequences).

    class_weighting: "balanced" weighs each class by (count of the layer's most frequent
    label) / (count of this label), at most `max_class_weight`, per layer: Dr.LLM's class
    rebalancing, capped so that a handful of rare labels cannot dominate; "none": unweighted.
    focal_gamma: focal exponent >= 0 (0: plain cross-entropy).
    """

    steps: int = 300
    learning_rate: float = 3e-3
    weight_decay: float = 0.0
    focal_gamma: float = 2.0
    class_weighting: str = "balanced"
    max_class_weight: float = 10.0

    def __post_init__(self) -> None:
        checks = [
            ("steps", self.steps, self.steps >= 1, "an integer >= 1"),
            ("learning_rate", self.learning_rate, self.learning_rate > 0, "a value > 0"),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0, "a value >= 0"),
            ("focal_gamma", self.focal_gamma, self.focal_gamma >= 0, "a value >= 0"),
            (
                "class_weighting",
                self.class_weighting,
                self.class_weighting in CLASS_WEIGHTINGS,
                ", ".join(CLASS_WEIGHTINGS),
            ),
            ("max_class_weight", self.max_class_weight, self.max_class_weight >= 1, ">= 1"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}: got {value!r}; allowed: {allowed}")


@dataclasses.dataclass(frozen=True)
class RouterFit:
    """What `fit_layer_routers` reports: `losses [steps]` (the fitting loss before each update,
    averaged over layers) and router accuracy against the labels per layer, `[num_layers]`,
    before and after the fit."""

    losses: jax.Array
    accuracy_before: jax.Array
    accuracy_after: jax.Array


def _check_routable(model: TransformerLM) -> None:
    for layer, block in enumerate(model.blocks):
        if block.is_mod:
            raise ValueError(
                f"model.blocks[{layer}]: a mixture-of-depths block; allowed: plain blocks "
                "(layer routers cannot share a block with mixture-of-depths)"
            )


def _contexts(model: TransformerLM, tokens: jax.Array) -> list[RouterContext]:
    # As in TransformerLM.__call__ at evaluation: no routing noise; layer routers rule out the
    # recurrent router, so no state is carried from layer to layer.
    shared = {}
    if hasattr(model, "router_gru"):
        shared = {name: value[...] for name, value in model.router_gru.items()}
    return [
        RouterContext(token_ids=tokens, shared_router_params=shared)
        for _ in range(len(model.blocks))
    ]


def _apply(model: TransformerLM, layer: int, x: jax.Array, context: RouterContext) -> jax.Array:
    """One evaluation-mode application of block `layer`: `x + f(x)`, as `routed_block` does."""
    update, _, _ = model.blocks[layer].residual_update(x, context, train=False)
    return constrain(x + update.astype(x.dtype), ACTIVATION)


def _execute_path(model: TransformerLM, tokens: jax.Array) -> list[jax.Array]:
    """The residual streams `[batch, length, d_model]` before block 0, ..., after the last one."""
    _check_routable(model)
    contexts = _contexts(model, tokens)
    streams = [model.embed(tokens)]
    for layer, context in enumerate(contexts):
        streams.append(_apply(model, layer, streams[-1], context))
    return streams


def sequence_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean next-token negative log-likelihood (nats) per sequence.

    Args:
      logits: [batch, length, vocab].
      targets: [batch, length] int.

    Returns:
      [batch] float32.
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.mean(nll, axis=1)


def option_losses(model: TransformerLM, tokens: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-sequence loss when one layer skips, executes or repeats and every other one executes.

    Dr.LLM: Dynamic Layer Routing in LLMs (the per-layer greedy proxy of its search). Entry
    `[l, b, o]` equals the loss of `model(tokens, train=False, layer_decisions=d)` with `d[l] =
    o` and `d[m] = EXECUTE` for m != l, for the whole batch at once. The blocks before `l` are
    shared by all options, so this costs about 2 + num_layers / 2 forward passes instead of
    3 * num_layers. Python loops over the (static) layers: jit-friendly.

    Args:
      model: the frozen LM, evaluation mode.
      tokens: [batch, length] int32.
      targets: [batch, length] int32 next tokens.

    Returns:
      [num_layers, batch, 3] float32 nats, options in `LAYER_DECISIONS` order.
    """
    streams = _execute_path(model, tokens)
    contexts = _contexts(model, tokens)
    num_layers = len(contexts)

    def finish(x: jax.Array, first_layer: int) -> jax.Array:
        for layer in range(first_layer, num_layers):
            x = _apply(model, layer, x, contexts[layer])
        return sequence_losses(model.logits(x), targets)  # [batch]

    execute = finish(streams[-1], num_layers)
    per_layer = []
    for layer in range(num_layers):
        skip = finish(streams[layer], layer + 1)
        repeated = _apply(model, layer, streams[layer + 1], contexts[layer])
        repeat = finish(repeated, layer + 1)
        per_layer.append(jnp.stack([skip, execute, repeat], axis=-1))  # [batch, 3]
    return jnp.stack(per_layer)


def router_inputs(model: TransformerLM, tokens: jax.Array) -> jax.Array:
    """What each layer router reads on the all-execute path: the sequence mean of the residual
    stream entering its block, as a one-token sequence (the router pools by the mean, so its
    logits on this equal its logits on the whole stream).

    Args:
      model: the frozen LM.
      tokens: [batch, length] int32.

    Returns:
      [num_layers, batch, 1, d_model] float32.
    """
    streams = _execute_path(model, tokens)[:-1]
    return jnp.stack([jnp.mean(x.astype(jnp.float32), axis=1, keepdims=True) for x in streams])


def layer_labels(losses: jax.Array, *, compute_penalty: float) -> jax.Array:
    """Teacher decisions per layer and sequence: `greedy_decisions` of each layer's options.

    Args:
      losses: [num_layers, batch, 3] from `option_losses`.
      compute_penalty: loss (nats) charged per block application, >= 0.

    Returns:
      [num_layers, batch] int32 in {SKIP, EXECUTE, REPEAT}.
    """
    if losses.ndim != 3:
        raise ValueError(f"losses: got shape {losses.shape}; allowed: [num_layers, batch, 3]")
    return jax.vmap(lambda layer: greedy_decisions(layer, compute_penalty=compute_penalty))(losses)


def block_applications(decisions: jax.Array) -> jax.Array:
    """Block applications per sequence under `decisions [num_layers, batch]` -> `[batch]`: skip,
    execute and repeat run a block 0, 1 and 2 times, which are their indices."""
    return jnp.sum(decisions.astype(jnp.int32), axis=0)


def get_router_params(model: TransformerLM) -> dict[str, jax.Array]:
    """Every block's layer-router weights stacked over layers: `{"w_in": [num_layers, d, h],
    "b_in": [num_layers, h], "w_out": [num_layers, h, 3], "b_out": [num_layers, 3]}`."""
    if model.config.depth.layer_router_dim < 1:
        raise ValueError(
            f"model.config.depth.layer_router_dim: got {model.config.depth.layer_router_dim!r}; "
            "allowed: >= 1 (a model with layer routers)"
        )
    blocks = nnx.to_pure_dict(nnx.state(model, ROUTER_PARAMS))["blocks"]
    per_layer = [blocks[layer]["layer_router"] for layer in range(len(model.blocks))]
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_layer)


def set_router_params(model: TransformerLM, stacked: dict[str, jax.Array]) -> None:
    """Writes `stacked` (as from `get_router_params`) into the model's routers, nothing else."""
    state = nnx.state(model, ROUTER_PARAMS)
    pure = {
        "blocks": {
            layer: {"layer_router": {name: value[layer] for name, value in stacked.items()}}
            for layer in range(len(model.blocks))
        }
    }
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


def stacked_router_logits(stacked: dict[str, jax.Array], inputs: jax.Array) -> jax.Array:
    """Router logits of every layer: `inputs [num_layers, batch, length, d_model]` ->
    `[num_layers, batch, 3]`."""
    return jax.vmap(layer_router_logits)(inputs, stacked)


def router_accuracy(
    stacked: dict[str, jax.Array], inputs: jax.Array, labels: jax.Array
) -> jax.Array:
    """Share of sequences whose router argmax equals the label, per layer.

    Args:
      stacked: from `get_router_params`.
      inputs: [num_layers, batch, length, d_model], e.g. from `router_inputs`.
      labels: [num_layers, batch] int.

    Returns:
      [num_layers] float32.
    """
    predicted = jnp.argmax(stacked_router_logits(stacked, inputs), axis=-1)
    return jnp.mean((predicted == labels).astype(jnp.float32), axis=1)


def class_weights(labels: jax.Array, options: FitOptions) -> jax.Array | None:
    """Per-layer class weights `[num_layers, 3]` for `labels [num_layers, batch]`, or None.

    "balanced": majority count / class count, capped at `options.max_class_weight`; classes
    absent from a layer get 0 (they weigh nothing either way).
    """
    if options.class_weighting == "none":
        return None
    counts = jnp.sum(
        jax.nn.one_hot(labels, len(LAYER_DECISIONS), dtype=jnp.float32), axis=1
    )  # [num_layers, 3]
    ratio = jnp.max(counts, axis=1, keepdims=True) / jnp.maximum(counts, 1.0)
    return jnp.where(counts > 0, jnp.minimum(ratio, options.max_class_weight), 0.0)


def fitting_loss(
    stacked: dict[str, jax.Array],
    inputs: jax.Array,
    labels: jax.Array,
    weights: jax.Array | None,
    focal_gamma: float,
) -> jax.Array:
    """`layer_router_loss` averaged over layers (shapes as in `router_accuracy`; `weights
    [num_layers, 3]` or None)."""
    logits = stacked_router_logits(stacked, inputs)  # [num_layers, batch, 3]
    if weights is None:
        per_layer = jax.vmap(lambda z, y: layer_router_loss(z, y, focal_gamma=focal_gamma))(
            logits, labels
        )
    else:
        per_layer = jax.vmap(
            lambda z, y, w: layer_router_loss(z, y, class_weights=w, focal_gamma=focal_gamma)
        )(logits, labels, weights)
    return jnp.mean(per_layer)


def fit_router_params(
    stacked: dict[str, jax.Array], inputs: jax.Array, labels: jax.Array, options: FitOptions
) -> tuple[dict[str, jax.Array], jax.Array]:
    """Full-batch AdamW on the routers alone: (fitted params, `[steps]` loss before each step).

    Pure: the LM is not involved, only the router inputs it produced. Shapes as in
    `router_accuracy`.
    """
    if labels.shape != inputs.shape[:2]:
        raise ValueError(
            f"labels: got shape {labels.shape}; allowed: {inputs.shape[:2]} "
            "(num_layers, batch of the inputs)"
        )
    weights = class_weights(labels, options)
    optimizer = optax.adamw(options.learning_rate, weight_decay=options.weight_decay)

    def step(carry, _):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(fitting_loss)(
            params, inputs, labels, weights, options.focal_gamma
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @jax.jit
    def run(params):
        (params, _), losses = jax.lax.scan(
            step, (params, optimizer.init(params)), length=options.steps
        )
        return params, losses

    return run(stacked)


def fit_layer_routers(
    model: TransformerLM, inputs: jax.Array, labels: jax.Array, options: FitOptions
) -> RouterFit:
    """Fits the model's layer routers to `labels` in place; every other variable is untouched.

    Dr.LLM: Dynamic Layer Routing in LLMs (supervised routers on a frozen LM, class-balanced
    focal loss).

    Args:
      model: an LM with `config.depth.layer_router_dim >= 1`.
      inputs: [num_layers, sequences, length, d_model] from `router_inputs` (length 1).
      labels: [num_layers, sequences] int from `layer_labels`.
      options: the fitting hyper-parameters.
    """
    before = get_router_params(model)
    fitted, losses = fit_router_params(before, inputs, labels, options)
    if not bool(jnp.all(jnp.isfinite(losses))):
        raise FloatingPointError(
            f"fit_layer_routers: the fitting loss became non-finite ({losses[-1]}); "
            "the model's routers are left unchanged"
        )
    set_router_params(model, fitted)
    return RouterFit(
        losses=losses,
        accuracy_before=router_accuracy(before, inputs, labels),
        accuracy_after=router_accuracy(fitted, inputs, labels),
    )


__all__ = [
    "CLASS_WEIGHTINGS",
    "ROUTER_PARAMS",
    "FitOptions",
    "RouterFit",
    "block_applications",
    "class_weights",
    "fit_layer_routers",
    "fit_router_params",
    "fitting_loss",
    "get_router_params",
    "layer_labels",
    "option_losses",
    "router_accuracy",
    "router_inputs",
    "sequence_losses",
    "set_router_params",
    "stacked_router_logits",
]
