"""Checks, losses and constants shared by the router families in this package."""

import jax
import jax.numpy as jnp

Params = dict[str, jax.Array]

# Router weights start near uniform (std 0.02, as `MoELayer.router` and the BlockFFN and RMoE
# reference code do): their logits decide discrete assignments.
ROUTER_INIT_STD = 0.02


def require(ok: bool, field: str, value: object, allowed: str) -> None:
    """Raises `ValueError("{field}: got {value}; allowed: {allowed}")` unless `ok`."""
    if not ok:
        raise ValueError(f"{field}: got {value!r}; allowed: {allowed}")


def check_hidden(hidden: jax.Array, weight: jax.Array, weight_name: str) -> None:
    """Validates hidden [tokens, d_model] against a parameter whose first dimension is d_model."""
    require(hidden.ndim == 2, "hidden", f"shape {hidden.shape}", "[tokens, d_model]")
    require(
        hidden.shape[1] == weight.shape[0],
        "hidden",
        f"shape {hidden.shape}",
        f"[tokens, d_model={weight.shape[0]}] to match params[{weight_name!r}] {weight.shape}",
    )


def check_int(value: object, field: str, minimum: int = 1) -> None:
    require(isinstance(value, int) and value >= minimum, field, value, f"an int >= {minimum}")


def check_top_k(top_k: int, num_experts: int) -> None:
    require(
        isinstance(top_k, int) and 1 <= top_k <= num_experts,
        "top_k",
        top_k,
        f"an int with 1 <= top_k <= num_experts={num_experts}",
    )


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
