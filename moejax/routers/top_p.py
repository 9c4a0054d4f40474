"""Top-p routing: a variable number of experts per token.

Huang et al., "Harder Tasks Need More Experts: Dynamic Routing in MoE Models" (2024): a token
takes experts in order of probability until their cumulative probability reaches a threshold p,
and an entropy penalty (the paper's dynamic loss, "router_entropy", weighted by
`router_entropy_weight`) keeps the router from spreading its probability to buy more experts.

A token's unused slots keep the next experts in probability order with combine weight exactly 0:
shapes stay static ([tokens, top_k] with top_k the maximum), the dispatch computes those slots
and they contribute nothing.
"""

import dataclasses

import jax
import jax.numpy as jnp

from moejax.errors import require_config
from moejax.routers.base import (
    COMMON_LOSS_WEIGHTS,
    RouterSpec,
    Routing,
    TopKOptions,
    check_router_inputs,
    register,
    require,
)
from moejax.routers.losses import active_load_balance_loss, router_entropy_loss, router_z_loss


@dataclasses.dataclass(frozen=True)
class TopPOptions(TopKOptions):
    """Options of the top-p router.

    Attributes:
      top_p: the cumulative-probability threshold in (0, 1].
      entropy_weight: weight of the entropy ("dynamic") loss in the training loss: small, so
        it only nudges the router (check it against Huang et al. 2024 before quoting it).
    """

    top_p: float = 0.4
    entropy_weight: float = 1e-4
    layer_fields = ("entropy_weight",)

    def __post_init__(self) -> None:
        require_config(
            0.0 < self.top_p <= 1.0, "model.router.options.top_p", self.top_p, "in (0, 1]"
        )
        require_config(
            self.entropy_weight >= 0,
            "model.router.options.entropy_weight",
            self.entropy_weight,
            ">= 0",
        )


def top_p_router(
    router_logits: jax.Array,
    *,
    top_k: int,
    renormalize: bool = True,
    top_p: float | jax.Array = 0.4,
) -> Routing:
    """The fewest most-probable experts whose probabilities sum to at least `top_p`.

    Huang et al., "Harder Tasks Need More Experts: Dynamic Routing in MoE Models" (2024). Expert
    j in descending probability order is active when the probabilities before it sum to less
    than `top_p`; so the first expert is always active and a token stops as soon as its
    cumulative probability reaches `top_p`, or at `top_k` experts, the most the static shapes
    hold. The default p = 0.4 is the threshold of the paper's main experiments (check it against
    the paper before quoting it). The paper's combine weights are the raw probabilities
    (`renormalize=False`); renormalising rescales the active ones to sum to 1.

    Args:
      router_logits: [tokens, num_experts], any floating dtype; the math runs in float32.
      top_k: the most experts per token, in [1, num_experts].
      renormalize: rescale the active weights to sum to 1 per token.
      top_p: the cumulative-probability threshold, in (0, 1]; a number or scalar array.

    Returns:
      A `Routing` whose combine weights are exactly 0 in unused slots, with aux_losses
      "load_balance" (over active assignments), "router_z" and "router_entropy" (the paper's
      dynamic loss: mean over tokens of the entropy of router_probs, in nats).
    """
    check_router_inputs(router_logits, top_k)
    if isinstance(top_p, int | float):  # a traced threshold (a schedule) cannot be checked
        require(0.0 < top_p <= 1.0, "top_p", top_p, "in (0, 1]")
    logits = router_logits.astype(jnp.float32)
    router_probs = jax.nn.softmax(logits, axis=-1)  # [tokens, experts]
    top_probs, expert_index = jax.lax.top_k(router_probs, top_k)  # [tokens, top_k]
    mass_before = jnp.cumsum(top_probs, axis=-1) - top_probs  # [tokens, top_k]
    # Slot 0 has mass_before exactly 0 < top_p, so every token keeps at least one expert.
    active = mass_before < top_p  # [tokens, top_k]
    combine_weights = jnp.where(active, top_probs, 0.0)
    if renormalize:
        combine_weights = combine_weights / jnp.sum(combine_weights, axis=-1, keepdims=True)
    expert_index = expert_index.astype(jnp.int32)
    return Routing(
        expert_index=expert_index,
        combine_weights=combine_weights,
        router_probs=router_probs,
        aux_losses={
            "load_balance": active_load_balance_loss(router_probs, combine_weights, expert_index),
            "router_z": router_z_loss(logits),
            "router_entropy": router_entropy_loss(router_probs),
        },
    )


def active_experts(routing_result: Routing) -> jax.Array:
    """[tokens] int32: the slots with nonzero combine weight, i.e. experts a token really uses."""
    return jnp.sum(routing_result.combine_weights != 0, axis=-1, dtype=jnp.int32)


SPEC = register(
    RouterSpec(
        "top_p",
        top_p_router,
        needs=("router_logits",),
        options=TopPOptions,
        loss_weights={**COMMON_LOSS_WEIGHTS, "router_entropy": "entropy_weight"},
    )
)
