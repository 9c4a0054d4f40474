"""Dr.LLM layer routing: per sequence, a small router picks skip / execute / repeat for a block.

`routed_block` applies a block 0, 1 or 2 times per sequence as `layer_router_logits` (or teacher
labels from `greedy_decisions`) decide; `layer_router_loss` trains the router on those labels.
`block_fn` follows the contract in `moejax.depth`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

BlockFn = Callable[..., jax.Array]
Params = Mapping[str, jax.Array]

# Dr.LLM's three actions, in order of compute: 0, 1 and 2 block applications.
SKIP, EXECUTE, REPEAT = 0, 1, 2
LAYER_DECISIONS = ("skip", "execute", "repeat")

_LAYER_ROUTER_KEYS = frozenset({"w_in", "b_in", "w_out", "b_out"})


def init_layer_router(
    key: jax.Array, d_model: int, hidden_dim: int, dtype: jnp.dtype = jnp.float32
) -> dict[str, jax.Array]:
    """Bottleneck-MLP layer router `{"w_in": [d, h], "b_in": [h], "w_out": [h, 3], "b_out": [3]}`.

    The output layer starts at zero so a fresh router is uniform over skip/execute/repeat and
    its first decisions come from the supervision, not from initialisation noise.
    """
    if hidden_dim < 1:
        raise ValueError(f"hidden_dim: got {hidden_dim!r}; allowed: an integer >= 1")
    return {
        "w_in": jax.random.normal(key, (d_model, hidden_dim), dtype) * d_model**-0.5,
        "b_in": jnp.zeros((hidden_dim,), dtype),
        "w_out": jnp.zeros((hidden_dim, len(LAYER_DECISIONS)), dtype),
        "b_out": jnp.zeros((len(LAYER_DECISIONS),), dtype),
    }


def layer_router_logits(x: jax.Array, router_params: Params) -> jax.Array:
    """Skip / execute / repeat logits per sequence from the mean-pooled hidden state.

    Dr.LLM: Dynamic Layer Routing in LLMs. The paper pools over windows; a plain mean over the
    sequence is the one-window case.

    Args:
      x: [batch, length, d_model].
      router_params: from `init_layer_router`.

    Returns:
      [batch, 3] float32, in `LAYER_DECISIONS` order.
    """
    if frozenset(router_params) != _LAYER_ROUTER_KEYS:
        raise ValueError(
            f"router_params: got keys {sorted(router_params)}; "
            f"allowed: {sorted(_LAYER_ROUTER_KEYS)}"
        )
    p = {name: value.astype(jnp.float32) for name, value in router_params.items()}
    pooled = jnp.mean(x.astype(jnp.float32), axis=1)  # [batch, d_model]
    hidden = jax.nn.gelu(pooled @ p["w_in"] + p["b_in"])  # [batch, hidden]
    return hidden @ p["w_out"] + p["b_out"]  # [batch, 3]


def routed_block(
    x: jax.Array,
    router_params: Params,
    block_fn: BlockFn,
    *,
    decision: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Apply a block 0, 1 or 2 times per sequence, as the layer router (or a teacher) decides.

    Dr.LLM: Dynamic Layer Routing in LLMs. skip: `y = x`; execute: `y = x + f(x)`; repeat:
    `y = x1 + f(x1)` with `x1 = x + f(x)`. The block is applied to the whole batch (twice) and
    each sequence picks its result, because shapes are static; the compute saving needs the
    caller to group sequences by decision (or to decode one sequence at a time).

    Args:
      x: [batch, length, d_model].
      router_params: from `init_layer_router`; unused when `decision` is given.
      block_fn: `[batch, length, d_model] -> [batch, length, d_model]` update.
      decision: optional [batch] int, values in {SKIP, EXECUTE, REPEAT}: teacher labels during
        supervised training. `None` takes the router's argmax.

    Returns:
      y: [batch, length, d_model] in x's dtype.
      decision: [batch] int32.
    """
    batch = x.shape[0]
    if decision is None:
        decision = jnp.argmax(layer_router_logits(x, router_params), axis=-1)
    elif decision.shape != (batch,):
        raise ValueError(f"decision: got shape {decision.shape}; allowed: ({batch},)")
    decision = decision.astype(jnp.int32)
    once = x + block_fn(x).astype(x.dtype)
    twice = once + block_fn(once).astype(x.dtype)
    choice = decision[:, None, None]  # [batch, 1, 1], broadcasts over length and d_model
    y = jnp.where(choice == SKIP, x, jnp.where(choice == EXECUTE, once, twice))
    return y, decision


def layer_router_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    class_weights: jax.Array | None = None,
    focal_gamma: float = 0.0,
) -> jax.Array:
    """Supervised loss of the layer router against teacher decisions.

    Dr.LLM: Dynamic Layer Routing in LLMs trains routers on decisions found by search, with a
    class-balanced focal loss because "execute" dominates the labels. With `focal_gamma=0` and
    no `class_weights` this is the mean cross-entropy. With weights it is normalised by the
    summed weights of the labels present, so the loss scale does not depend on the label mix.

    Args:
      logits: [batch, 3] from `layer_router_logits`.
      labels: [batch] int in {SKIP, EXECUTE, REPEAT}.
      class_weights: optional [3] non-negative weight per class.
      focal_gamma: focusing exponent >= 0; the loss per sequence is `-(1 - p)^gamma * log p`.

    Returns:
      scalar float32.
    """
    if focal_gamma < 0:
        raise ValueError(f"focal_gamma: got {focal_gamma!r}; allowed: a value >= 0")
    num_classes = len(LAYER_DECISIONS)
    if logits.shape[-1] != num_classes:
        raise ValueError(f"logits: got shape {logits.shape}; allowed: [batch, {num_classes}]")
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    log_p = jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    per_example = -log_p  # [batch]
    if focal_gamma > 0:
        # (1 - p)^gamma has an infinite derivative at p = 1 for gamma < 1; the floor keeps the
        # gradient finite once a router is confident (p rounds to 1 in float32).
        miss = jnp.maximum(-jnp.expm1(log_p), 1e-7)
        per_example = miss**focal_gamma * per_example
    if class_weights is None:
        return jnp.mean(per_example)
    if class_weights.shape != (num_classes,):
        raise ValueError(
            f"class_weights: got shape {class_weights.shape}; allowed: ({num_classes},)"
        )
    weight = class_weights.astype(jnp.float32)[labels]  # [batch]
    return jnp.sum(weight * per_example) / jnp.sum(weight)


def greedy_decisions(option_losses: jax.Array, *, compute_penalty: float = 0.0) -> jax.Array:
    """Teacher labels: per sequence, the action with the lowest (loss + penalty * blocks run).

    A one-layer, one-step stand-in for Dr.LLM's search. `compute_penalty` charges each block
    application (skip 0, execute 1, repeat 2), trading loss for compute the way the paper's
    budget does. Ties go to the cheaper action.

    Args:
      option_losses: [batch, 3] loss of each sequence under skip, execute, repeat.
      compute_penalty: loss units per block application, >= 0.

    Returns:
      [batch] int32 in {SKIP, EXECUTE, REPEAT}.
    """
    if compute_penalty < 0:
        raise ValueError(f"compute_penalty: got {compute_penalty!r}; allowed: a value >= 0")
    if option_losses.shape[-1] != len(LAYER_DECISIONS):
        raise ValueError(f"option_losses: got shape {option_losses.shape}; allowed: [batch, 3]")
    cost = jnp.arange(len(LAYER_DECISIONS), dtype=jnp.float32) * compute_penalty  # [3]
    return jnp.argmin(option_losses.astype(jnp.float32) + cost, axis=-1).astype(jnp.int32)
