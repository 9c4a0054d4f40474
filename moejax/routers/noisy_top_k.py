"""Noisy top-k gating.

Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer"
(2017): Gaussian noise on the router logits before the top-k choice spreads tokens over experts
whose logits are nearly tied, which helps load balance early in training.
"""

import math

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
from moejax.routers.softmax_top_k import softmax_top_k


def noisy_top_k(
    router_logits: jax.Array,
    *,
    top_k: int,
    renormalize: bool = True,
    rng: jax.Array | None = None,
    train: bool = True,
    noise_std: float | jax.Array | None = None,
    noise_logits: jax.Array | None = None,
) -> Routing:
    """Softmax top-k of `logits + noise_scale * N(0, 1)`; exactly `softmax_top_k` without noise.

    Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts
    Layer" (2017). The paper learns the noise scale per token and expert as
    `softplus(x @ W_noise)`; a router sees only logits, so that form is available by passing
    `noise_logits = x @ W_noise` (the layer owns `W_noise`). Without them the scale is the fixed
    `noise_std`. The paper's softmax over the kept top-k logits is the renormalized top-k of
    the full softmax, which is what `renormalize=True` gives. Its smooth "load" loss is not
    reproduced: aux_losses carry the Switch load-balancing loss of the noisy choice instead.

    Args:
      router_logits: [tokens, num_experts], any floating dtype; the math runs in float32.
      top_k: experts per token, in [1, num_experts].
      renormalize: see `moejax.softmax_top_k`.
      rng: key for the noise; None gives no noise (a deterministic router).
      train: noise is added only while training (and only with `rng`).
      noise_std: fixed noise scale, >= 0, a number or scalar array; default 1 / num_experts.
        Ignored with `noise_logits`.
      noise_logits: [tokens, num_experts] or None; the learned scale `softplus(noise_logits)`.

    Returns:
      A `Routing` whose router_probs are the softmax of the noisy logits (those picked the
      experts), with aux_losses "load_balance" (of the noisy choice) and "router_z" (of the
      clean logits, which the z-loss is meant to keep small).
    """
    num_experts = check_router_inputs(router_logits, top_k)
    if noise_std is None:
        noise_std = 1.0 / num_experts
    if isinstance(noise_std, int | float):  # a traced scale (an annealing schedule) is unchecked
        require(
            math.isfinite(noise_std) and noise_std >= 0, "noise_std", noise_std, "finite and >= 0"
        )
    if noise_logits is not None:
        require(
            noise_logits.shape == router_logits.shape,
            "noise_logits.shape",
            noise_logits.shape,
            f"the shape of router_logits, {router_logits.shape}",
        )
    logits = router_logits.astype(jnp.float32)
    noisy_logits = logits
    if rng is not None and train:
        if noise_logits is None:
            scale = jnp.asarray(noise_std, jnp.float32)
        else:
            scale = jax.nn.softplus(noise_logits.astype(jnp.float32))  # [tokens, experts]
        noise = jax.random.normal(rng, logits.shape, jnp.float32)  # [tokens, experts]
        noisy_logits = logits + scale * noise
    result = softmax_top_k(noisy_logits, top_k=top_k, renormalize=renormalize)
    return Routing(
        expert_index=result.expert_index,
        combine_weights=result.combine_weights,
        router_probs=result.router_probs,
        aux_losses={**result.aux_losses, "router_z": router_z_loss(logits)},
    )


SPEC = register(
    RouterSpec(
        "noisy_top_k", noisy_top_k, needs=("router_logits", "rng", "train"), options=TopKOptions
    )
)
