"""Similarity-aware routing: a token routes like the earlier tokens similar to it.

Nguyen et al., "Improving Routing in Sparse Mixture of Experts with Graph of Tokens" (2025); the
shared graph math and our causal reading of it are in `moejax.routers.graph`.
"""

import jax
import jax.numpy as jnp

from moejax.routers.base import RouterSpec, Routing, check_router_inputs, register, require
from moejax.routers.graph import (
    GraphRoutingOptions,
    check_mix,
    propagate,
    route_on_probs,
    token_similarity,
)


def similarity_aware_router(
    router_logits: jax.Array,
    *,
    top_k: int,
    seq_len: int,
    renormalize: bool = True,
    temperature: float = 1.0,
    mix: float = 1.0,
) -> Routing:
    """Top-k of the expert distribution averaged over similar earlier tokens.

    Nguyen et al., "Improving Routing in Sparse Mixture of Experts with Graph of Tokens" (2025),
    Similarity-Aware MoE, with the causal similarity of `token_similarity`.

    Args:
      router_logits: [tokens, num_experts], tokens = batch * seq_len in sequence order.
      top_k: experts per token, in [1, num_experts].
      seq_len: tokens per sequence (the graph never crosses sequences).
      renormalize: rescale the k chosen weights to sum to 1 per token.
      temperature: of the similarity softmax, > 0.
      mix: weight of the graph term, in [0, 1].

    Returns:
      A `Routing` whose router_probs are the mixed distribution (they chose the experts), with
      aux_losses "load_balance" of that choice and "router_z" of the logits.
    """
    check_router_inputs(router_logits, top_k)
    check_mix(mix)
    require(
        router_logits.shape[0] % seq_len == 0,
        "seq_len",
        seq_len,
        f"a divisor of the number of tokens {router_logits.shape[0]}",
    )
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [tokens, experts]
    graph = token_similarity(router_logits, seq_len=seq_len, temperature=temperature)
    mixed = propagate(probs, graph, seq_len, mix)
    return route_on_probs(router_logits, mixed, top_k=top_k, renormalize=renormalize)


SPEC = register(
    RouterSpec(
        "similarity_aware",
        similarity_aware_router,
        needs=("router_logits", "seq_len"),
        options=GraphRoutingOptions,
    )
)
