"""Checks and losses shared by the router families in this package."""

import jax
import jax.numpy as jnp


def require(ok: bool, field: str, value: object, allowed: str) -> None:
    """Raises `ValueError("{field}: got {value}; allowed: {allowed}")` unless `ok`."""
    if not ok:
        raise ValueError(f"{field}: got {value!r}; allowed: {allowed}")


def check_token_ids(token_ids: jax.Array | None, num_tokens: int, router: str) -> jax.Array:
    """Validates the token ids a token-id router needs and returns them as int32 [tokens]."""
    if token_ids is None:
        raise ValueError(
            f"token_ids: got None; allowed: an int array [tokens={num_tokens}] "
            f"(the {router!r} router routes by token id)"
        )
    token_ids = jnp.asarray(token_ids)
    require(
        token_ids.shape == (num_tokens,) and jnp.issubdtype(token_ids.dtype, jnp.integer),
        "token_ids",
        f"{token_ids.dtype}{list(token_ids.shape)}",
        f"an int array of shape [tokens={num_tokens}]",
    )
    return token_ids.astype(jnp.int32)


def active_load_balance_loss(
    router_probs: jax.Array, combine_weights: jax.Array, expert_index: jax.Array
) -> jax.Array:
    """Switch load-balancing loss over the active assignments only.

    Like `moejax.routing.load_balance_loss`, but a slot with combine weight exactly 0 (an
    unused slot of a router with a variable number of experts per token) is not counted in the
    assignment fractions `f_e`.

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
