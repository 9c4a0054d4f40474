"""Flux-style layer routing between full and sparse attention.

Flux Attention: Context-Aware Hybrid Attention for Efficient LLM Inference.

A small router reads the mean-pooled hidden states of a sequence and decides, per layer and
per sequence, whether that layer runs full (dense causal) or sparse attention. Deciding per
layer instead of per head keeps the work of a layer uniform. The router trains with the rest
of the model frozen: `router_param_filter` selects its parameters for `nnx.state` / `nnx.grad`
and `freeze_all_but_router` wraps an optax optimizer so only they move.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moejax.parallel.sharding import param

ROUTER_NAME = "flux_router"


def flux_gate(logit: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Hard full-attention decision with a straight-through gradient.

    Args:
      logit: [batch] router logits (positive favours full attention).

    Returns:
      (gate [batch] float32, exactly 0 or 1 in the forward pass, with the gradient of
      `sigmoid(logit)`; prob [batch] = sigmoid(logit)).
    """
    prob = jax.nn.sigmoid(logit.astype(jnp.float32))
    hard = (prob > 0.5).astype(jnp.float32)
    return prob + jax.lax.stop_gradient(hard - prob), prob


def flux_budget_loss(prob: jax.Array, target_full_share: float) -> jax.Array:
    """Squared gap between the mean full-attention probability and the allowed share, which
    trades quality (full attention) against cost (sparse). `prob [batch]` -> scalar."""
    return jnp.square(jnp.mean(prob) - target_full_share)


def mix_by_gate(gate: jax.Array, full: jax.Array, sparse: jax.Array) -> jax.Array:
    """`gate [batch]` in {0, 1} picks `full` or `sparse` (`[batch, ...]`) per sequence."""
    g = gate.reshape((-1,) + (1,) * (full.ndim - 1)).astype(full.dtype)
    return g * full + (1 - g) * sparse


class FluxRouter(nnx.Module):
    """`x [batch, length, d_model]` -> full-attention logit `[batch]`: RMS-normalised mean
    hidden state through a two-layer MLP."""

    def __init__(self, d_model: int, hidden: int, *, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.w_in = param(init(rngs.params(), (d_model, hidden), param_dtype), ("embed", None))
        self.w_out = param(jnp.zeros((hidden, 1), param_dtype), (None, None))
        # Starts preferring full attention (sigmoid(2) ~ 0.88): the frozen model was trained
        # dense, so the safe default is to keep it dense until the budget loss pushes back.
        self.bias = param(jnp.full((1,), 2.0, param_dtype), (None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        pooled = jnp.mean(x.astype(jnp.float32), axis=1)  # [batch, d_model]
        pooled = pooled * jax.lax.rsqrt(jnp.mean(jnp.square(pooled), -1, keepdims=True) + 1e-6)
        hidden = jax.nn.gelu(pooled @ self.w_in[...].astype(jnp.float32))
        return (hidden @ self.w_out[...].astype(jnp.float32))[:, 0] + self.bias[0]


router_param_filter = nnx.All(nnx.Param, nnx.PathContains(ROUTER_NAME))
"""NNX filter of the Flux router parameters, e.g. `nnx.state(model, router_param_filter)` or
`nnx.DiffState(0, router_param_filter)` for `nnx.grad`."""


def router_param_labels(params: Any) -> Any:
    """The params pytree with each leaf replaced by "train" (a Flux router parameter: its path
    holds `flux_router`) or "freeze"."""

    def label(path, _):
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        return "train" if ROUTER_NAME in names else "freeze"

    return jax.tree_util.tree_map_with_path(label, params)


def freeze_all_but_router(optimizer: optax.GradientTransformation, params: Any):
    """`optimizer` on the Flux router parameters of `params`, zero updates everywhere else."""
    return optax.multi_transform(
        {"train": optimizer, "freeze": optax.set_to_zero()}, router_param_labels(params)
    )
