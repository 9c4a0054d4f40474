"""The default router: softmax over experts, then the `top_k` most probable per token."""

import jax
import jax.numpy as jnp

from moejax.routers.base import RouterSpec, Routing, TopKOptions, check_router_inputs, register
from moejax.routers.losses import load_balance_loss, router_z_loss


def softmax_top_k(router_logits: jax.Array, *, top_k: int, renormalize: bool = True) -> Routing:
    """Softmax over experts, then the `top_k` most probable experts per token.

    Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts
    Layer" (2017); with `top_k=1` this is the Switch router, with `top_k=2` GShard's.

    Args:
      router_logits: [tokens, num_experts], any floating dtype; the math runs in float32.
      top_k: experts per token, in [1, num_experts].
      renormalize: rescale the chosen probabilities to sum to 1 per token; otherwise the
        combine weights are the raw softmax probabilities.

    Returns:
      A `Routing` with aux_losses "load_balance" and "router_z".
    """
    check_router_inputs(router_logits, top_k)
    logits = router_logits.astype(jnp.float32)
    router_probs = jax.nn.softmax(logits, axis=-1)  # [tokens, experts]
    top_probs, expert_index = jax.lax.top_k(router_probs, top_k)  # [tokens, top_k]
    if renormalize:
        # The chosen probabilities sum to at least top_k / num_experts, so this never divides by 0.
        top_probs = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
    return Routing(
        expert_index=expert_index.astype(jnp.int32),
        combine_weights=top_probs,
        router_probs=router_probs,
        aux_losses={
            "load_balance": load_balance_loss(router_probs, expert_index),
            "router_z": router_z_loss(logits),
        },
    )


SPEC = register(RouterSpec("softmax_top_k", softmax_top_k, options=TopKOptions))
