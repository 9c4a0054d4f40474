"""Mixture-of-depths: only the top-C tokens per sequence go through a block; the rest skip it.

`mixture_of_depths` routes with a learned scalar router and top-C over each sequence (training);
`mixture_of_depths_causal` selects with a causal predictor instead (decoding). The predictor
(`init_causal_predictor`, `causal_predictor_logits`) trains alongside from
`predictor_loss_and_accuracy`. `block_fn` follows the contract in `moejax.depth`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

BlockFn = Callable[..., jax.Array]
Params = Mapping[str, jax.Array]

ROUTER_ACTIVATIONS = ("identity", "sigmoid")

_LINEAR_PREDICTOR_KEYS = frozenset({"w", "b"})
_MLP_PREDICTOR_KEYS = frozenset({"w_hidden", "b_hidden", "w_out", "b_out"})


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
