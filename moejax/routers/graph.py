"""Graph-of-tokens routing: a token's expert distribution mixed with those of related tokens.

Nguyen et al., "Improving Routing in Sparse Mixture of Experts with Graph of Tokens" (2025).
Softmax gating lets every token pick its experts independently, which the paper links to
routing fluctuation late in training. Its two routers couple the choices of related tokens:

- Similarity-aware: `P' = S P`, with `S` a row-stochastic similarity between tokens.
- Attention-aware: `P' = A P`, with `A` the attention matrix of the preceding attention block
  (averaged over heads), so a token routes like the tokens it attends to.

Both then pick the top-k experts of `P'` and weight them by `P'`. `mix` in [0, 1] interpolates
`(1 - mix) P + mix P'`; 1 is the paper's router, 0 is plain softmax top-k.

Our reading for a causal language model: `S` and `A` only connect a token to itself and
earlier tokens of the same sequence. A token's combine weights then depend on no future token, so
next-token prediction stays causal (the attention matrix of a causal block already is).
`S_ij = softmax_j(<z_i, z_j> / (temperature * sqrt(num_experts)))` over the router logits z:
similarity measured in the router's own space, `X W_r W_r^T X^T`, so no new parameters.

This module holds what both share; the routers are `moejax.routers.similarity_aware` and
`moejax.routers.attention_aware`.
"""

import dataclasses

import jax
import jax.numpy as jnp

from moejax.errors import require_config
from moejax.routers.base import Routing, TopKOptions, require
from moejax.routers.losses import active_load_balance_loss, router_z_loss


@dataclasses.dataclass(frozen=True)
class GraphRoutingOptions(TopKOptions):
    """Options of the graph-of-tokens routers.

    Attributes:
      mix: weight of the graph term in [0, 1]: 1 routes on the graph-averaged distribution
        (the paper's router), 0 is plain softmax top-k.
    """

    mix: float = 1.0

    def __post_init__(self) -> None:
        require_config(0.0 <= self.mix <= 1.0, "model.router.options.mix", self.mix, "in [0, 1]")


def check_mix(mix: float) -> None:
    """`mix` (the weight of the graph term) must lie in [0, 1]."""
    require(0.0 <= mix <= 1.0, "mix", mix, "in [0, 1]")


def route_on_probs(
    router_logits: jax.Array, mixed_probs: jax.Array, *, top_k: int, renormalize: bool
) -> Routing:
    """Top-k of `mixed_probs [tokens, experts]` with its weights; losses of the mixed choice."""
    combine_weights, expert_index = jax.lax.top_k(mixed_probs, top_k)  # [tokens, top_k]
    if renormalize:
        combine_weights = combine_weights / jnp.sum(combine_weights, axis=-1, keepdims=True)
    expert_index = expert_index.astype(jnp.int32)
    return Routing(
        expert_index=expert_index,
        combine_weights=combine_weights,
        router_probs=mixed_probs,
        aux_losses={
            "load_balance": active_load_balance_loss(mixed_probs, combine_weights, expert_index),
            "router_z": router_z_loss(router_logits.astype(jnp.float32)),
        },
    )


def propagate(probs: jax.Array, graph: jax.Array, seq_len: int, mix: float) -> jax.Array:
    """`(1 - mix) P + mix G P` per sequence: `probs [tokens, E]`, `graph [batch, L, L]`."""
    num_experts = probs.shape[-1]
    per_sequence = probs.reshape(-1, seq_len, num_experts)  # [batch, L, E]
    neighbours = jnp.einsum("bij,bje->bie", graph, per_sequence).reshape(probs.shape)
    return (1.0 - mix) * probs + mix * neighbours


def token_similarity(router_logits: jax.Array, *, seq_len: int, temperature: float) -> jax.Array:
    """Causal row-stochastic similarity `[batch, L, L]` of tokens in router-logit space.

    Args:
      router_logits: [tokens, num_experts], tokens = batch * seq_len in sequence order.
      seq_len: tokens per sequence.
      temperature: > 0; lower sharpens the similarity towards each token itself.
    """
    require(temperature > 0, "temperature", temperature, "> 0")
    num_experts = router_logits.shape[-1]
    z = router_logits.astype(jnp.float32).reshape(-1, seq_len, num_experts)  # [b, L, E]
    scores = jnp.einsum("bie,bje->bij", z, z) / (temperature * num_experts**0.5)
    causal = jnp.tril(jnp.ones((seq_len, seq_len), bool))
    scores = jnp.where(causal, scores, -jnp.inf)  # the diagonal keeps every row finite
    return jax.nn.softmax(scores, axis=-1)
