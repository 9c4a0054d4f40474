"""Conditional depth: mixture-of-depths token routing, per-sequence layer routing, norm halting.

Three ways to spend less than one full block per token, all pure functions around a caller's
`block_fn`, so the transformer can wrap any block (attention + MLP, or a MoE feed-forward):

- `mixture_of_depths`: per sequence, only the top-C tokens by a learned scalar router go
  through the block; the rest ride the residual stream unchanged. `mixture_of_depths_causal`
  is the decoding-time variant that selects with a causal predictor instead of top-C.
- `routed_block`: per sequence, a small router picks skip / execute / repeat (Dr.LLM).
- `relative_norm_halting` / `halting_mask_from_previous`: per token, skip a MoE update whose
  norm is small next to the residual stream (Equifinality).

Contract for `block_fn`: it receives `[batch, n, d_model]` tokens and returns the block's
residual *update* (what the block adds to its input), same shape. Causal masking inside the
tokens it is given is the block's job; routing decides only which tokens it is given.
Routing math runs in float32 whatever the activation dtype, as in `moejax.routing`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

BlockFn = Callable[..., jax.Array]
Params = Mapping[str, jax.Array]

ROUTER_ACTIVATIONS = ("identity", "sigmoid")

# Dr.LLM's three actions, in order of compute: 0, 1 and 2 block applications.
SKIP, EXECUTE, REPEAT = 0, 1, 2
LAYER_DECISIONS = ("skip", "execute", "repeat")

_LINEAR_PREDICTOR_KEYS = frozenset({"w", "b"})
_MLP_PREDICTOR_KEYS = frozenset({"w_hidden", "b_hidden", "w_out", "b_out"})
_LAYER_ROUTER_KEYS = frozenset({"w_in", "b_in", "w_out", "b_out"})


# --------------------------------------------------------------------------------------------
# Mixture-of-depths
# --------------------------------------------------------------------------------------------


def mod_capacity(length: int, capacity_fraction: float) -> int:
    """Tokens per sequence that a mixture-of-depths block processes: `ceil(fraction * length)`.

    Raises ValueError unless `0 < capacity_fraction <= 1` and `length >= 1`.
    """
    if not 0.0 < capacity_fraction <= 1.0:
        raise ValueError(f"capacity_fraction: got {capacity_fraction!r}; allowed: 0 < value <= 1")
    if length < 1:
        raise ValueError(f"length: got {length!r}; allowed: an integer >= 1")
    # Rounding first keeps float noise (0.7 * 10 = 7.000000000000001) from adding a token.
    return min(length, math.ceil(round(capacity_fraction * length, 9)))


def _check_router_activation(router_activation: str) -> None:
    if router_activation not in ROUTER_ACTIVATIONS:
        raise ValueError(
            f"router_activation: got {router_activation!r}; "
            f"allowed: {', '.join(ROUTER_ACTIVATIONS)}"
        )


def _check_probability_threshold(threshold: float) -> None:
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold: got {threshold!r}; allowed: 0 < value < 1")


def mod_router_scores(x: jax.Array, router_weights: jax.Array) -> jax.Array:
    """Scalar router score per token, `r = x @ w`, in float32.

    Args:
      x: [batch, length, d_model].
      router_weights: [d_model].

    Returns:
      [batch, length] float32.
    """
    if router_weights.shape != (x.shape[-1],):
        raise ValueError(
            f"router_weights: got shape {router_weights.shape}; allowed: ({x.shape[-1]},)"
        )
    return jnp.einsum("bld,d->bl", x.astype(jnp.float32), router_weights.astype(jnp.float32))


def top_c_index(scores: jax.Array, capacity: int) -> jax.Array:
    """Positions of the `capacity` highest scores per sequence, in increasing position order.

    Sorting keeps the selected tokens in their original order, so causal attention inside the
    gathered subsequence still only looks backwards. Ties go to the earlier position.

    Args:
      scores: [batch, length].
      capacity: tokens kept per sequence, 1..length.

    Returns:
      [batch, capacity] int32.
    """
    _, index = jax.lax.top_k(scores, capacity)  # [batch, capacity], best first
    return jnp.sort(index, axis=-1).astype(jnp.int32)


def _gather_tokens(x: jax.Array, index: jax.Array) -> jax.Array:
    return jnp.take_along_axis(x, index[..., None], axis=1)  # [batch, n, d_model]


def _router_weight(scores: jax.Array, router_activation: str) -> jax.Array:
    return jax.nn.sigmoid(scores) if router_activation == "sigmoid" else scores


def _call_block(block_fn: BlockFn, x: jax.Array, positions: jax.Array, with_positions: bool):
    update = block_fn(x, positions) if with_positions else block_fn(x)
    if update.shape != x.shape:
        raise ValueError(f"block_fn: returned shape {update.shape}; allowed: {x.shape}")
    return update


def init_causal_predictor(
    key: jax.Array, d_model: int, hidden_dim: int | None = None, dtype: jnp.dtype = jnp.float32
) -> dict[str, jax.Array]:
    """Parameters of the mixture-of-depths causal predictor.

    `hidden_dim=None` gives a linear predictor `{"w": [d_model], "b": []}`; otherwise a one-hidden-
    layer MLP `{"w_hidden": [d_model, hidden], "b_hidden": [hidden], "w_out": [hidden],
    "b_out": []}`.
    """
    if hidden_dim is None:
        return {
            "w": jax.random.normal(key, (d_model,), dtype) * d_model**-0.5,
            "b": jnp.zeros((), dtype),
        }
    if hidden_dim < 1:
        raise ValueError(f"hidden_dim: got {hidden_dim!r}; allowed: None or an integer >= 1")
    key_hidden, key_out = jax.random.split(key)
    return {
        "w_hidden": jax.random.normal(key_hidden, (d_model, hidden_dim), dtype) * d_model**-0.5,
        "b_hidden": jnp.zeros((hidden_dim,), dtype),
        "w_out": jax.random.normal(key_out, (hidden_dim,), dtype) * hidden_dim**-0.5,
        "b_out": jnp.zeros((), dtype),
    }


def causal_predictor_logits(x: jax.Array, predictor_params: Params) -> jax.Array:
    """Logit that each token is among its sequence's top-C, from that token alone.

    The input is `stop_gradient(x)`: the predictor learns to imitate the router without pulling
    the residual stream towards being easy to predict (Mixture-of-Depths, section 3.5). It reads
    one token at a time, so it is causal whatever the sequence looks like after that token.

    Args:
      x: [batch, length, d_model].
      predictor_params: from `init_causal_predictor` (linear or MLP).

    Returns:
      [batch, length] float32.
    """
    keys = frozenset(predictor_params)
    h = jax.lax.stop_gradient(x).astype(jnp.float32)
    p = {name: value.astype(jnp.float32) for name, value in predictor_params.items()}
    if keys == _LINEAR_PREDICTOR_KEYS:
        return jnp.einsum("bld,d->bl", h, p["w"]) + p["b"]
    if keys == _MLP_PREDICTOR_KEYS:
        hidden = jax.nn.gelu(jnp.einsum("bld,dh->blh", h, p["w_hidden"]) + p["b_hidden"])
        return jnp.einsum("blh,h->bl", hidden, p["w_out"]) + p["b_out"]
    raise ValueError(
        f"predictor_params: got keys {sorted(keys)}; allowed: {sorted(_LINEAR_PREDICTOR_KEYS)} "
        f"or {sorted(_MLP_PREDICTOR_KEYS)}"
    )


def predictor_loss_and_accuracy(
    logits: jax.Array, selected_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Binary cross-entropy of the causal predictor against the top-C selection, and accuracy.

    Args:
      logits: [batch, length] predictor logits.
      selected_mask: [batch, length] bool, the top-C selection (the target).

    Returns:
      (mean BCE, share of tokens whose predicted membership `logit > 0` matches), float32.
    """
    logits = logits.astype(jnp.float32)
    target = selected_mask.astype(jnp.float32)
    # log(sigmoid(z)) and log(1 - sigmoid(z)) through log_sigmoid stay finite for large |z|.
    bce = -(target * jax.nn.log_sigmoid(logits) + (1.0 - target) * jax.nn.log_sigmoid(-logits))
    accuracy = jnp.mean(((logits > 0) == selected_mask).astype(jnp.float32))
    return jnp.mean(bce), accuracy


def mixture_of_depths(
    x: jax.Array,
    router_weights: jax.Array,
    block_fn: BlockFn,
    *,
    capacity_fraction: float,
    router_activation: str = "identity",
    predictor_params: Params | None = None,
    block_takes_positions: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One mixture-of-depths block: the top-C tokens per sequence get the block, the rest skip.

    Mixture-of-Depths: Dynamically allocating compute in transformer-based language models
    (Raposo et al., 2024). With `r = x @ w` per token and `C = ceil(capacity_fraction * length)`:
    `y_i = x_i + g(r_i) * block(x_selected)_i` for the C tokens with the highest r in their
    sequence, and `y_i = x_i` for every other token. The block sees only the gathered C tokens
    (in original order), which is where the compute saving comes from: a `[batch, C, d]` block.

    `g` is the identity by default: the paper multiplies the block output by the raw router
    weight `r_i`, which is what puts the router on the gradient path (top-C alone is not
    differentiable). `router_activation="sigmoid"` uses `sigmoid(r_i)`, a common bounded variant;
    the paper's choice is the default because PAPERS.md builds MoD from its published definition.

    Top-C over a sequence looks at future tokens, so it is not causal; train the causal
    predictor alongside (pass `predictor_params`, add `aux["predictor_loss"]` to the loss) and
    decode with `mixture_of_depths_causal`.

    Args:
      x: [batch, length, d_model] residual stream.
      router_weights: [d_model].
      block_fn: `[batch, C, d_model] -> [batch, C, d_model]` update; with
        `block_takes_positions=True` it is called as `block_fn(x_selected, positions)` with the
        selected tokens' original positions `[batch, C]` int32 (for rotary embeddings).
      capacity_fraction: share of each sequence's tokens that the block processes, in (0, 1].
      router_activation: one of `ROUTER_ACTIVATIONS`.
      predictor_params: optional causal predictor (`init_causal_predictor`); adds its loss and
        accuracy to `aux`.
      block_takes_positions: see `block_fn`.

    Returns:
      y: [batch, length, d_model] in x's dtype.
      aux: `selected_index [batch, C]` int32, `selected_mask [batch, length]` bool,
        `router_scores [batch, length]` float32, and with a predictor, scalar float32
        `predictor_loss` and `predictor_accuracy`.
    """
    _check_router_activation(router_activation)
    batch, length, _ = x.shape
    capacity = mod_capacity(length, capacity_fraction)
    scores = mod_router_scores(x, router_weights)  # [batch, length]
    index = top_c_index(scores, capacity)  # [batch, C]
    update = _call_block(block_fn, _gather_tokens(x, index), index, block_takes_positions)
    weight = _router_weight(jnp.take_along_axis(scores, index, axis=1), router_activation)
    weighted = (weight[..., None] * update.astype(jnp.float32)).astype(x.dtype)  # [batch, C, d]
    rows = jnp.arange(batch)[:, None]  # [batch, 1], broadcasts against index
    y = x.at[rows, index].add(weighted)
    selected_mask = jnp.zeros((batch, length), bool).at[rows, index].set(True)
    aux = {"selected_index": index, "selected_mask": selected_mask, "router_scores": scores}
    if predictor_params is not None:
        logits = causal_predictor_logits(x, predictor_params)
        aux["predictor_loss"], aux["predictor_accuracy"] = predictor_loss_and_accuracy(
            logits, selected_mask
        )
    return y, aux


def mixture_of_depths_causal(
    x: jax.Array,
    router_weights: jax.Array,
    predictor_params: Params,
    block_fn: BlockFn,
    *,
    threshold: float = 0.5,
    router_activation: str = "identity",
    block_takes_positions: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mixture-of-depths for autoregressive decoding: the causal predictor picks the tokens.

    Mixture-of-Depths: Dynamically allocating compute in transformer-based language models
    (Raposo et al., 2024), section 3.5. A token is processed when
    `sigmoid(predictor logit) > threshold`; the update is still weighted by the router's `g(r)`,
    so a predictor that matches top-C reproduces `mixture_of_depths` (up to the block's float
    rounding on a longer input).

    How many tokens are picked is data-dependent, but JAX shapes are static, so the block runs
    on all `length` tokens reordered selected-first (stable, so selected tokens keep their
    order and a causal block never lets them see an unselected one), and only the selected
    tokens' updates are kept. This reproduces the selection semantics but saves no FLOPs by
    itself; in a one-token decode step the saving comes from the serving loop skipping the
    block for sequences (or a whole batch of one) that the predictor leaves out, and from not
    writing their keys and values to the cache.

    Args:
      x: [batch, length, d_model]; length is 1 in a cached decode step.
      router_weights: [d_model].
      predictor_params: from `init_causal_predictor`.
      block_fn: as in `mixture_of_depths`, called on `[batch, length, d_model]`.
      threshold: predicted probability above which a token is processed, in (0, 1).
      router_activation: one of `ROUTER_ACTIVATIONS`.
      block_takes_positions: as in `mixture_of_depths`; positions are `[batch, length]` int32.

    Returns:
      y: [batch, length, d_model] in x's dtype.
      aux: `selected_mask [batch, length]` bool, `selected_fraction` scalar float32,
        `router_scores [batch, length]` float32.
    """
    _check_router_activation(router_activation)
    _check_probability_threshold(threshold)
    scores = mod_router_scores(x, router_weights)  # [batch, length]
    selected = select_tokens_causal(x, predictor_params, threshold=threshold)
    # A stable sort on "not selected" puts selected tokens first, in their original order.
    order = jnp.argsort(~selected, axis=-1, stable=True).astype(jnp.int32)  # [batch, length]
    update_sorted = _call_block(block_fn, _gather_tokens(x, order), order, block_takes_positions)
    inverse = jnp.argsort(order, axis=-1)  # [batch, length], undoes the reordering
    update = _gather_tokens(update_sorted, inverse)
    weighted = (
        _router_weight(scores, router_activation)[..., None] * update.astype(jnp.float32)
    ).astype(x.dtype)
    y = jnp.where(selected[..., None], x + weighted, x)
    aux = {
        "selected_mask": selected,
        "selected_fraction": jnp.mean(selected.astype(jnp.float32)),
        "router_scores": scores,
    }
    return y, aux


def select_tokens_causal(
    x: jax.Array, predictor_params: Params, *, threshold: float = 0.5
) -> jax.Array:
    """Decode-time mixture-of-depths selection: `sigmoid(predictor logit) > threshold`.

    Args:
      x: [batch, length, d_model].
      predictor_params: from `init_causal_predictor`.
      threshold: in (0, 1); 0.5 is the paper's choice.

    Returns:
      [batch, length] bool.
    """
    _check_probability_threshold(threshold)
    return jax.nn.sigmoid(causal_predictor_logits(x, predictor_params)) > threshold


# --------------------------------------------------------------------------------------------
# Dr.LLM layer routing: skip / execute / repeat per sequence
# --------------------------------------------------------------------------------------------


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
    per_example = -((1.0 - jnp.exp(log_p)) ** focal_gamma) * log_p  # [batch]
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


# --------------------------------------------------------------------------------------------
# Relative-norm halting for MoE layers
# --------------------------------------------------------------------------------------------


def _check_halting_threshold(threshold: float) -> None:
    if not (math.isfinite(threshold) and threshold >= 0.0):
        raise ValueError(f"threshold: got {threshold!r}; allowed: a finite value >= 0")


def relative_norm(x: jax.Array, update: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Per token `||update|| / ||x||` over the last axis, in float32.

    Args:
      x, update: [..., d_model].
      eps: floor on `||x||` so an all-zero token does not divide by zero.

    Returns:
      [...] float32.
    """
    norm_update = jnp.linalg.norm(update.astype(jnp.float32), axis=-1)
    norm_x = jnp.linalg.norm(x.astype(jnp.float32), axis=-1)
    return norm_update / jnp.maximum(norm_x, eps)


def apply_halting(
    x: jax.Array, update: jax.Array, halted: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`y = x` for halted tokens, `x + update` for the rest.

    Args:
      x, update: [..., d_model].
      halted: [...] bool.

    Returns:
      y in x's dtype, and aux: `halted_fraction` scalar float32 (the share of this layer's
      expert FLOPs that halting can save) and `relative_norm [...]` float32 of the update that
      was applied (0 for halted tokens), which feeds the next `halting_mask_from_previous`.
    """
    y = jnp.where(halted[..., None], x, x + update.astype(x.dtype))
    rel = jnp.where(halted, 0.0, relative_norm(x, update))
    aux = {"halted_fraction": jnp.mean(halted.astype(jnp.float32)), "relative_norm": rel}
    return y, aux


def relative_norm_halting(
    x: jax.Array, update: jax.Array, *, threshold: float
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Skip a MoE layer's update for tokens where it is small next to the residual stream.

    Equifinality in Mixture of Experts: Routing Topology Does Not Determine Language Modeling
    Quality (zero-shot relative-norm halting: 25% of MoE FLOPs saved at +0.12% PPL). Per token
    `rho = ||update|| / ||x||`; `y = x` where `rho < threshold`, else `x + update`. Zero-shot:
    no training, only a threshold.

    This oracle form needs the update to decide, so the experts have already run and it saves
    no compute: use it to measure how much quality a threshold costs and what share of tokens
    it halts. The deployable form decides before the experts run, from a norm already known:
    `halting_mask_from_previous` on the previous MoE application's relative norm (previous
    layer, or previous hop of a multi-hop MoE; PAPERS.md gives only the headline, not which),
    then `apply_halting` with the halted tokens left out of dispatch.

    Args:
      x: [..., d_model] the MoE layer's input residual stream.
      update: [..., d_model] the MoE layer's output (what it adds to x).
      threshold: halt where the relative norm is below this, >= 0.

    Returns:
      y in x's dtype, and aux: `halted_fraction` and `mean_relative_norm` scalar float32, and
      `relative_norm [...]` float32 of every token's update (halted or not).
    """
    _check_halting_threshold(threshold)
    rel = relative_norm(x, update)
    y, aux = apply_halting(x, update, rel < threshold)
    aux["relative_norm"] = rel
    aux["mean_relative_norm"] = jnp.mean(rel)
    return y, aux


def halting_mask_from_previous(
    prev_relative_norm: jax.Array,
    threshold: float,
    *,
    previously_halted: jax.Array | None = None,
) -> jax.Array:
    """Decide halting before the experts run, from the previous MoE update's relative norm.

    Equifinality in Mixture of Experts: Routing Topology Does Not Determine Language Modeling
    Quality. A token halts when the previous update was small (`rho < threshold`), or when it
    had already halted (`previously_halted`): a halted token has no new update to measure, so
    its decision carries forward.

    Args:
      prev_relative_norm: [...] float, e.g. `aux["relative_norm"]` of the previous layer.
      threshold: >= 0.
      previously_halted: optional [...] bool.

    Returns:
      [...] bool, True where this layer's experts can be skipped.
    """
    _check_halting_threshold(threshold)
    halted = prev_relative_norm < threshold
    if previously_halted is not None:
        halted = halted | previously_halted
    return halted


def moe_flops_saved_fraction(
    halted_fractions: jax.Array, flops_per_layer: jax.Array | None = None
) -> jax.Array:
    """Share of all MoE FLOPs saved across layers: `sum(h_l * F_l) / sum(F_l)`.

    Args:
      halted_fractions: [layers] share of tokens halted in each MoE layer.
      flops_per_layer: optional [layers] expert FLOPs per layer when every token runs; equal
        layers (a plain mean) when omitted.

    Returns:
      scalar float32.
    """
    halted = jnp.asarray(halted_fractions, jnp.float32)
    if flops_per_layer is None:
        return jnp.mean(halted)
    flops = jnp.asarray(flops_per_layer, jnp.float32)
    if flops.shape != halted.shape:
        raise ValueError(
            f"flops_per_layer: got shape {flops.shape}; allowed: {halted.shape} "
            "(one entry per layer, like halted_fractions)"
        )
    return jnp.sum(halted * flops) / jnp.sum(flops)
