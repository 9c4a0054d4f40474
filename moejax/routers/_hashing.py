"""Routers that ignore the hidden state: experts fixed per token id by a hash or a random table.

Roller et al., "Hash Layers For Large Sparse Models" (2021) route each token by a fixed function
of its vocabulary id; nothing is learned, so nothing can collapse and no balancing loss is needed.
They are the "hash" and "random-fixed" baselines of the routing-topology comparison in
"Equifinality in Mixture of Experts: Routing Topology Does Not Determine Language Modeling
Quality".

This module holds the hashing and the routing they share; the routers are
`moejax.routers.hash_layer` and `moejax.routers.random_fixed`.
"""

import jax
import jax.numpy as jnp

from moejax.routers.base import (
    Routing,
    require,
)
from moejax.routers.losses import load_balance_loss, router_z_loss

GATES = ("uniform", "softmax")

# Odd 32-bit constants: the murmur3 finaliser's multipliers and the golden-ratio increment.
_MIX_1 = 0x85EBCA6B
_MIX_2 = 0xC2B2AE35
_GOLDEN = 0x9E3779B9


def mix32(x: jax.Array) -> jax.Array:
    """The murmur3 32-bit finaliser, elementwise on uint32 (any shape).

    A bijection whose output bits each depend on every input bit, so consecutive token ids land
    on unrelated experts. The multiplications wrap modulo 2**32 by design.
    """
    x = x.astype(jnp.uint32)
    x = x ^ (x >> 16)
    x = x * jnp.uint32(_MIX_1)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(_MIX_2)
    return x ^ (x >> 16)


def hash_expert_index(
    token_ids: jax.Array, num_experts: int, top_k: int, seed: int = 0
) -> jax.Array:
    """`top_k` distinct experts per token id, a fixed pseudo-random function of the id.

    Every (id, expert) pair gets the score `mix32(mix32(id ^ salt) + expert)`, with
    `salt = mix32(seed + 0x9E3779B9)`, and the token takes its `top_k` highest-scoring experts:
    for top_k = 1 a uniform hash over experts, for larger top_k a hashed prefix of a
    permutation, so the experts are always distinct.

    Args:
      token_ids: [tokens] int.
      num_experts: experts to choose from.
      top_k: experts per token, in [1, num_experts].
      seed: selects one of 2**32 hash functions (e.g. one per layer).

    Returns:
      [tokens, top_k] int32.
    """
    salt = mix32(jnp.uint32(seed % 2**32) + jnp.uint32(_GOLDEN))
    token_key = mix32(token_ids.astype(jnp.uint32) ^ salt)  # [tokens]
    experts = jnp.arange(num_experts, dtype=jnp.uint32)
    scores = mix32(token_key[:, None] + experts)  # [tokens, experts]
    _, expert_index = jax.lax.top_k(scores, top_k)  # [tokens, top_k]
    return expert_index.astype(jnp.int32)


def random_fixed_table(vocab_size: int, num_experts: int, top_k: int, table_seed: int) -> jax.Array:
    """[vocab_size, top_k] int32: for each id, `top_k` distinct experts drawn once from a seed."""
    scores = jax.random.uniform(jax.random.key(table_seed), (vocab_size, num_experts))
    _, table = jax.lax.top_k(scores, top_k)  # [vocab, top_k]
    return table.astype(jnp.int32)


def fixed_routing(
    router_logits: jax.Array, expert_index: jax.Array, *, renormalize: bool, gate: str
) -> Routing:
    """A `Routing` for experts chosen without the logits: [tokens, top_k] index -> gates."""
    require(gate in GATES, "gate", gate, ", ".join(GATES))
    logits = router_logits.astype(jnp.float32)
    router_probs = jax.nn.softmax(logits, axis=-1)  # [tokens, experts]
    if gate == "uniform":
        combine_weights = jnp.full(expert_index.shape, 1.0 / expert_index.shape[-1], jnp.float32)
    elif renormalize:
        chosen = jnp.take_along_axis(logits, expert_index, axis=-1)  # [tokens, top_k]
        combine_weights = jax.nn.softmax(chosen, axis=-1)
    else:
        combine_weights = jnp.take_along_axis(router_probs, expert_index, axis=-1)
    return Routing(
        expert_index=expert_index,
        combine_weights=combine_weights,
        router_probs=router_probs,
        aux_losses={
            "load_balance": jnp.zeros((), jnp.float32),
            "load_balance_unweighted": load_balance_loss(router_probs, expert_index),
            "router_z": router_z_loss(logits),
        },
    )
