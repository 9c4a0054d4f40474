"""Attention-aware routing: a token routes like the tokens the preceding attention reads.

Nguyen et al., "Improving Routing in Sparse Mixture of Experts with Graph of Tokens" (2025); the
shared graph math and our causal reading of it are in `moejax.routers.graph`.
"""

import jax
import jax.numpy as jnp

from moejax.routers.base import RouterSpec, Routing, check_router_inputs, register, require
from moejax.routers.graph import GraphRoutingOptions, check_mix, propagate, route_on_probs


def attention_aware_router(
    router_logits: jax.Array,
    *,
    top_k: int,
    attention_probs: jax.Array | None = None,
    renormalize: bool = True,
    mix: float = 1.0,
) -> Routing:
    """Top-k of the expert distribution averaged over the tokens the previous attention reads.

    Nguyen et al., "Improving Routing in Sparse Mixture of Experts with Graph of Tokens" (2025),
    Attention-Aware MoE.

    Args:
      router_logits: [tokens, num_experts], tokens = batch * L in sequence order.
      top_k: experts per token, in [1, num_experts].
      attention_probs: [batch, L, L], rows summing to 1: the preceding attention block's
        weights averaged over heads (`moejax.attention.Attention` returns them on request).
      renormalize: rescale the k chosen weights to sum to 1 per token.
      mix: weight of the graph term, in [0, 1].

    Returns:
      As `similarity_aware_router`.
    """
    check_router_inputs(router_logits, top_k)
    check_mix(mix)
    if attention_probs is None:
        raise ValueError(
            "attention_probs: got None; allowed: [batch, L, L] head-averaged attention weights "
            "(the attention_aware router reads the preceding attention block)"
        )
    batch, seq_len = attention_probs.shape[0], attention_probs.shape[1]
    require(
        attention_probs.ndim == 3
        and attention_probs.shape[2] == seq_len
        and batch * seq_len == router_logits.shape[0],
        "attention_probs",
        f"shape {attention_probs.shape}",
        f"[batch, L, L] with batch * L = tokens = {router_logits.shape[0]}",
    )
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [tokens, experts]
    graph = attention_probs.astype(jnp.float32)
    mixed = propagate(probs, graph, seq_len, mix)
    return route_on_probs(router_logits, mixed, top_k=top_k, renormalize=renormalize)


SPEC = register(
    RouterSpec(
        "attention_aware",
        attention_aware_router,
        needs=("router_logits", "attention_probs"),
        options=GraphRoutingOptions,
    )
)
