"""Auxiliary losses of routers: pure functions of a routing decision, each returning a scalar.

A router puts the ones it computes in `Routing.aux_losses`; its `RouterSpec.loss_weights` says
which config weight scales each in the training loss.
"""

import jax
import jax.numpy as jnp
from jax.scipy.special import entr

from moejax.routers.base import expert_load


def load_balance_loss(router_probs: jax.Array, expert_index: jax.Array) -> jax.Array:
    """Switch Transformer load-balancing loss.

    Fedus, Zoph, Shazeer, "Switch Transformers: Scaling to Trillion Parameter Models with Simple
    and Efficient Sparsity" (2021): `num_experts * sum_e f_e * P_e`, where `f_e` is the fraction
    of the tokens * top_k assignments sent to expert e and `P_e` the mean router probability of
    e. It is 1.0 at perfect balance and `num_experts` when every token goes to one expert with
    probability 1. Only `P_e` carries gradient; `f_e` comes from a discrete choice.

    Args:
      router_probs: [tokens, num_experts].
      expert_index: [tokens, top_k] int.

    Returns:
      scalar float32.
    """
    num_experts = router_probs.shape[-1]
    assignment_fraction = expert_load(expert_index, num_experts)  # [experts]
    mean_prob = jnp.mean(router_probs.astype(jnp.float32), axis=0)  # [experts]
    return num_experts * jnp.sum(assignment_fraction * mean_prob)


def active_load_balance_loss(
    router_probs: jax.Array, combine_weights: jax.Array, expert_index: jax.Array
) -> jax.Array:
    """Switch load-balancing loss over the active assignments only.

    Like `load_balance_loss`, but a slot with combine weight exactly 0 (an unused slot of a
    router with a variable number of experts per token) is not counted in the assignment
    fractions `f_e`.

    Args:
      router_probs: [tokens, num_experts].
      combine_weights: [tokens, top_k]; zero marks an unused slot.
      expert_index: [tokens, top_k] int.

    Returns:
      scalar float32.
    """
    num_experts = router_probs.shape[-1]
    active = (combine_weights != 0).astype(jnp.float32)  # [tokens, top_k]
    counts = (
        jnp.zeros(num_experts, jnp.float32).at[expert_index.reshape(-1)].add(active.reshape(-1))
    )  # [experts]
    # Every token keeps at least one active slot, so the total is positive for tokens > 0.
    assignment_fraction = counts / jnp.maximum(jnp.sum(active), 1.0)  # [experts]
    mean_prob = jnp.mean(router_probs.astype(jnp.float32), axis=0)  # [experts]
    return num_experts * jnp.sum(assignment_fraction * mean_prob)


def router_z_loss(router_logits: jax.Array) -> jax.Array:
    """ST-MoE router z-loss: `mean_tokens(logsumexp(logits) ** 2)`.

    Zoph et al., "ST-MoE: Designing Stable and Transferable Sparse Expert Models" (2022). It keeps
    logits small, where bf16 round-off in the router's exponentials stays harmless.

    Args:
      router_logits: [tokens, num_experts].

    Returns:
      scalar float32.
    """
    log_z = jax.nn.logsumexp(router_logits.astype(jnp.float32), axis=-1)  # [tokens]
    return jnp.mean(jnp.square(log_z))


def router_entropy_loss(router_probs: jax.Array) -> jax.Array:
    """Mean over tokens of the entropy of the router's distribution, in nats.

    The dynamic loss of Huang et al., "Harder Tasks Need More Experts: Dynamic Routing in MoE
    Models" (2024): minimising it keeps a top-p router from spreading its probability to buy
    more experts.

    Args:
      router_probs: [tokens, num_experts].

    Returns:
      scalar float32.
    """
    return jnp.mean(jnp.sum(entr(router_probs.astype(jnp.float32)), axis=-1))
