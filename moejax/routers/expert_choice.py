"""Experts choose tokens: each expert takes its C most probable tokens.

Zhou et al., "Mixture-of-Experts with Expert Choice Routing" (2022). Token-choice routers let
every token pick its experts, so loads are unequal and need a balancing loss and a capacity that
drops the overflow. Here the choice is transposed: the router's softmax over experts is computed
per token as usual, and then every expert takes the C tokens with the highest probability for it.
Every expert processes exactly C tokens, so the load is balanced by construction; a token may be
taken by several experts or by none (its routed output is then zero and only the residual
carries it).

The result is the token-major `Routing` every dispatch strategy reads: each token has
`max_slots` slots, its choosing experts first (most probable first) with their probabilities as
combine weights, then the experts that did not choose it, in probability order, with combine
weight exactly 0, so that shapes stay static. `max_slots` defaults to top_k, the [tokens, top_k]
shape every router in the registry returns; a token taken by more experts than that keeps its
most probable ones, and the rest of those choices are lost ("truncated_fraction" counts them).
`max_slots=num_experts` loses nothing. This plain truncation is not the capped expert choice
the paper ablates, which enforces the cap while solving the assignment (check the paper before
comparing the two).

Zero-weight slots still cost dispatch compute and, in the "capacity" strategy, buffer slots,
where they can push out real assignments: the capacity strategy drops nothing once every expert
has a slot per token, i.e. `capacity_factor >= num_experts / max_slots` in `moe_ffn` (1.0 with
`max_slots=num_experts`, where each expert receives exactly one slot per token).
"""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp

from moejax.routers.base import (
    RouterSpec,
    Routing,
    TopKOptions,
    check_router_inputs,
    register,
    require,
)
from moejax.routers.losses import router_z_loss


def expert_choice_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens per expert: `C = min(tokens, ceil(tokens * capacity_factor / num_experts))`.

    The paper's capacity factor c is the average number of experts per token: the experts take
    `num_experts * C ~= tokens * c` (token, expert) pairs in all. C is at least 1, and at most
    `tokens`, since an expert can take every token only once.
    """
    if not (math.isfinite(capacity_factor) and capacity_factor > 0):
        raise ValueError(f"capacity_factor: got {capacity_factor}; allowed: finite and > 0")
    # Fraction(str(.)) reads 1.1 as 11/10, free of float round-off (as `expert_capacity` does).
    slots = Fraction(num_tokens) * Fraction(str(capacity_factor)) / num_experts
    return min(num_tokens, max(1, math.ceil(slots)))


def expert_choice(
    router_logits: jax.Array,
    *,
    top_k: int,
    renormalize: bool = True,
    capacity_factor: float | None = None,
    max_slots: int | None = None,
) -> Routing:
    """Every expert takes its `C` most probable tokens (see `expert_choice_capacity`).

    Zhou et al., "Mixture-of-Experts with Expert Choice Routing" (2022). Ties go to the earlier
    token. The paper combines with the raw probabilities (`renormalize=False`); renormalising
    rescales each token's active weights to sum to 1 and leaves unchosen tokens at 0.

    The selection couples the tokens of a batch: whether a token is taken depends on every other
    token, later ones included, which an autoregressive decoder does not know yet.

    Args:
      router_logits: [tokens, num_experts], any floating dtype; the math runs in float32.
      top_k: in [1, num_experts]; the capacity factor when `capacity_factor` is None, so that
        tokens get top_k experts on average, like a top-k token-choice router.
      renormalize: rescale each token's active combine weights to sum to 1.
      capacity_factor: the paper's c, experts per token on average, finite and > 0, or None.
      max_slots: slots per token, in [1, num_experts], or None for top_k. A token taken by
        more than `max_slots` experts keeps only its `max_slots` most probable ones: the others
        lose that assignment. num_experts loses nothing, at the cost of dispatching every
        (token, expert) pair.

    Returns:
      A `Routing` with expert_index and combine_weights [tokens, max_slots] (weight exactly 0
      in unused slots) and aux_losses "load_balance" (0.0: balanced by construction),
      "router_z", and, for monitoring only (never weight it as a loss), "truncated_fraction":
      the share of the experts' choices lost to `max_slots`.
    """
    num_experts = check_router_inputs(router_logits, top_k)
    num_tokens = router_logits.shape[0]
    if capacity_factor is None:
        capacity_factor = float(top_k)
    capacity = expert_choice_capacity(num_tokens, num_experts, capacity_factor)
    if max_slots is None:
        max_slots = top_k
    require(
        isinstance(max_slots, int) and 1 <= max_slots <= num_experts,
        "max_slots",
        max_slots,
        f"an int in [1, num_experts={num_experts}]",
    )
    logits = router_logits.astype(jnp.float32)
    router_probs = jax.nn.softmax(logits, axis=-1)  # [tokens, experts]
    _, chosen_tokens = jax.lax.top_k(router_probs.T, capacity)  # [experts, capacity]
    expert_rows = jnp.arange(num_experts)[:, None]  # [experts, 1]
    chosen = (
        jnp.zeros((num_experts, num_tokens), bool).at[expert_rows, chosen_tokens].set(True).T
    )  # [tokens, experts]

    # Probabilities lie in [0, 1], so shifting the unchosen ones to [-2, -1] ranks every choosing
    # expert before every other one while keeping probability order within each group.
    slot_key = jnp.where(chosen, router_probs, router_probs - 2.0)  # [tokens, experts]
    _, expert_index = jax.lax.top_k(slot_key, max_slots)  # [tokens, max_slots]
    slot_chosen = jnp.take_along_axis(chosen, expert_index, axis=-1)  # [tokens, max_slots]
    slot_probs = jnp.take_along_axis(router_probs, expert_index, axis=-1)
    combine_weights = jnp.where(slot_chosen, slot_probs, 0.0)  # [tokens, max_slots]
    # Every expert chose exactly `capacity` tokens; count the choices that no slot holds.
    lost_choices = num_experts * capacity - jnp.sum(slot_chosen, dtype=jnp.int32)
    truncated_fraction = lost_choices.astype(jnp.float32) / (num_experts * capacity)
    if renormalize:
        total = jnp.sum(combine_weights, axis=-1, keepdims=True)  # [tokens, 1]
        # Unchosen tokens have total 0: the inner where keeps their gradient finite, not NaN.
        safe_total = jnp.where(total > 0, total, 1.0)
        combine_weights = jnp.where(total > 0, combine_weights / safe_total, 0.0)
    return Routing(
        expert_index=expert_index.astype(jnp.int32),
        combine_weights=combine_weights,
        router_probs=router_probs,
        aux_losses={
            "load_balance": jnp.zeros((), jnp.float32),
            "router_z": router_z_loss(logits),
            "truncated_fraction": truncated_fraction,
        },
    )


SPEC = register(RouterSpec("expert_choice", expert_choice, options=TopKOptions))
