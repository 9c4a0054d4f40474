"""Routers: pure functions from router logits to a `Routing` (which experts, with what weight).

Routing math runs in float32 whatever the activation dtype: bf16 softmax and top-k ties make
expert choice noisy and the auxiliary losses biased (as flaxformer's routers also do).
"""

import dataclasses
from collections.abc import Callable, KeysView

import jax
import jax.numpy as jnp
from jax.scipy.special import entr


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """What a router decided for each token.

    Attributes:
      expert_index: [tokens, top_k] int32, the chosen experts, best first.
      combine_weights: [tokens, top_k] float32, the weight of each chosen expert's output.
      router_probs: [tokens, num_experts] float32, the full softmax over experts.
      aux_losses: name -> scalar float32, unweighted; the layer applies the config's weights.
    """

    expert_index: jax.Array
    combine_weights: jax.Array
    router_probs: jax.Array
    aux_losses: dict[str, jax.Array]


RouterFn = Callable[..., Routing]

_ROUTERS: dict[str, RouterFn] = {}

# A live view, so routers registered after import (in other modules) are listed too.
ROUTER_NAMES: KeysView[str] = _ROUTERS.keys()


def register_router(name: str) -> Callable[[RouterFn], RouterFn]:
    """Decorator that makes a router selectable by `name` from a config string."""

    def register(router: RouterFn) -> RouterFn:
        if name in _ROUTERS:
            raise ValueError(f"router: name {name!r} is already registered")
        _ROUTERS[name] = router
        return router

    return register


def get_router(name: str) -> RouterFn:
    """The router registered under `name`."""
    if name not in _ROUTERS:
        # Registration order keeps the built-in softmax_top_k first, whichever modules registered
        # more routers after it.
        raise ValueError(f"router: unknown name {name!r}; allowed: {', '.join(_ROUTERS)}")
    return _ROUTERS[name]


def check_router_inputs(router_logits: jax.Array, top_k: int) -> int:
    """Validates the arguments every router shares and returns num_experts.

    Args:
      router_logits: [tokens, num_experts].
      top_k: experts per token (the maximum, for routers with a variable number), in
        [1, num_experts].
    """
    if router_logits.ndim != 2:
        raise ValueError(
            f"router_logits: expected [tokens, num_experts], got shape {router_logits.shape}"
        )
    num_experts = router_logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: got {top_k}; allowed: 1 <= top_k <= num_experts={num_experts}")
    return num_experts


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
    assignment_fraction = _expert_load(expert_index, num_experts)  # [experts]
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


@register_router("softmax_top_k")
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


def routing_statistics(routing: Routing, num_experts: int) -> dict[str, jax.Array]:
    """Diagnostics of a routing decision, for logging (no gradients intended).

    Args:
      routing: a `Routing` for some tokens.
      num_experts: the number of experts routed over.

    Returns:
      "expert_load": [num_experts], fraction of the tokens * top_k assignments per expert (sums
        to 1); "load_max_over_mean": scalar, 1.0 at perfect balance, num_experts when collapsed;
      "routing_entropy": scalar, mean over tokens of the entropy of router_probs, in nats.
    """
    if routing.router_probs.shape[-1] != num_experts:
        raise ValueError(
            f"num_experts: got {num_experts} but router_probs has shape "
            f"{routing.router_probs.shape}"
        )
    expert_load = _expert_load(routing.expert_index, num_experts)  # [experts]
    # entr(p) = -p log p with entr(0) = 0, so experts with zero probability add nothing.
    entropy = jnp.sum(entr(routing.router_probs.astype(jnp.float32)), axis=-1)  # [tokens]
    return {
        "expert_load": expert_load,
        "load_max_over_mean": jnp.max(expert_load) / jnp.mean(expert_load),
        "routing_entropy": jnp.mean(entropy),
    }


def _expert_load(expert_index: jax.Array, num_experts: int) -> jax.Array:
    """Fraction of all assignments that go to each expert: [tokens, top_k] -> [num_experts]."""
    counts = jnp.bincount(expert_index.reshape(-1), length=num_experts)  # [experts]
    return counts.astype(jnp.float32) / expert_index.size
