"""Balanced token-to-expert assignment by Sinkhorn iterations, on every token or a share of them.

Clark et al., "Unified Scaling Laws for Routed Language Models" (2022) route with Sinkhorn
(S-BASE): the router's exponentiated logits are scaled per token and per expert into a transport
plan in which every expert receives the same mass, and each token takes the top-k experts of its
row of the plan. Nguyen et al., "Selective Sinkhorn Routing for Improved Sparse Mixture of
Experts" (2025) apply that transport to only part of the routing and read the gating scores from
the transport plan, replacing the auxiliary load-balancing and z-losses.

A row of the plan is `softmax(logits + v)` for a per-expert log-scale `v`, so Sinkhorn routing is
softmax top-k with an expert bias chosen to equalise the expected expert loads. The selective
variant is `moejax.routers.selective_sinkhorn`; it shares the plan and routing code here.
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
from moejax.routers.losses import load_balance_loss, router_z_loss

GATE_SOURCES = ("softmax", "plan")


def sinkhorn_log_plan(
    router_logits: jax.Array, *, top_k: int, num_iters: int = 20, tolerance: float = 1e-6
) -> jax.Array:
    """Log of the transport plan between tokens and experts with balanced expert marginals.

    Sinkhorn-Knopp matrix scaling of `exp(router_logits)` in log space (exponentials of large
    logits overflow float32). Each iteration first makes every row sum to `top_k` (each token
    sends top_k units of mass), then every column sum to `tokens * top_k / num_experts` (each
    expert receives an equal share). Iteration stops early, keeping the current plan, once an
    iteration would move the row log-scales by less than `tolerance`: after a column update that
    move is exactly the rows' log-marginal error. A fixed-length `lax.scan` freezes the scales
    instead of exiting, so the plan stays reverse-mode differentiable.

    Args:
      router_logits: [tokens, num_experts].
      top_k: mass each token sends, in [1, num_experts].
      num_iters: the most row-then-column iterations, >= 1.
      tolerance: early-stopping threshold on the rows' log-marginal error, >= 0 (0 never stops).

    Returns:
      [tokens, num_experts] float32, the log plan: its columns sum (in exp space) exactly to
      tokens * top_k / num_experts, its rows to top_k up to the final row error.
    """
    num_experts = check_router_inputs(router_logits, top_k)
    check_options(num_iters, tolerance)
    logits = router_logits.astype(jnp.float32)
    num_tokens = logits.shape[0]
    log_row_mass = jnp.float32(math.log(top_k))
    log_column_mass = jnp.float32(math.log(num_tokens * top_k / num_experts))

    def iteration(carry, i):
        row_scale, column_scale, done = carry  # [tokens], [experts], scalar bool
        new_row = log_row_mass - jax.nn.logsumexp(logits + column_scale, axis=1)  # [tokens]
        new_column = log_column_mass - jax.nn.logsumexp(logits + new_row[:, None], axis=0)
        # The first iteration starts from unscaled columns, so its row move says nothing.
        converged = (i > 0) & (jnp.max(jnp.abs(new_row - row_scale)) < tolerance)
        done = done | converged
        row_scale = jnp.where(done, row_scale, new_row)
        column_scale = jnp.where(done, column_scale, new_column)
        return (row_scale, column_scale, done), None

    start = (
        jnp.zeros(num_tokens, jnp.float32),
        jnp.zeros(num_experts, jnp.float32),
        jnp.zeros((), bool),
    )
    (row_scale, column_scale, _), _ = jax.lax.scan(iteration, start, jnp.arange(num_iters))
    return logits + row_scale[:, None] + column_scale  # [tokens, experts]


def sinkhorn(
    router_logits: jax.Array,
    *,
    top_k: int,
    renormalize: bool = True,
    train: bool = True,
    num_iters: int = 20,
    tolerance: float = 1e-6,
    gate_source: str = "softmax",
) -> Routing:
    """Experts from the top-k of a balanced transport plan (S-BASE).

    Clark et al., "Unified Scaling Laws for Routed Language Models" (2022). The plan balances the
    expected loads, so there is no auxiliary balancing loss: "load_balance" is 0.0 and the Switch
    loss of the choice is reported as "load_balance_unweighted" for monitoring. As in S-BASE the
    combine weights default to the router's softmax at the chosen experts (the plan only picks
    them); `gate_source="plan"` reads them from the plan instead, as selective Sinkhorn does.

    The plan couples the tokens of a batch: a token's experts depend on every other token, later
    ones included, which an autoregressive decoder cannot know. With `train=False` the router
    therefore routes like `softmax_top_k`.

    Args:
      router_logits: [tokens, num_experts], any floating dtype; the math runs in float32.
      top_k: experts per token, in [1, num_experts].
      renormalize: rescale the chosen gates to sum to 1 per token.
      train: use the transport plan (True) or plain softmax top-k (False).
      num_iters, tolerance: see `sinkhorn_log_plan`.
      gate_source: "softmax" or "plan", where the combine weights come from.

    Returns:
      A `Routing` with aux_losses "load_balance" (0.0), "load_balance_unweighted" and
      "router_z".
    """
    return route_on_plan(
        router_logits,
        top_k=top_k,
        renormalize=renormalize,
        sinkhorn_mask=None if train else False,
        num_iters=num_iters,
        tolerance=tolerance,
        gate_source=gate_source,
        replaces_z_loss=False,
    )


def route_on_plan(
    router_logits: jax.Array,
    *,
    top_k: int,
    renormalize: bool,
    sinkhorn_mask: jax.Array | bool | None,
    num_iters: int,
    tolerance: float,
    gate_source: str,
    replaces_z_loss: bool,
) -> Routing:
    """Shared body: `sinkhorn_mask` [tokens] bool picks plan routing; None all, False none."""
    check_router_inputs(router_logits, top_k)
    check_options(num_iters, tolerance)
    require(gate_source in GATE_SOURCES, "gate_source", gate_source, ", ".join(GATE_SOURCES))
    logits = router_logits.astype(jnp.float32)
    router_probs = jax.nn.softmax(logits, axis=-1)  # [tokens, experts]
    _, expert_index = jax.lax.top_k(logits, top_k)  # [tokens, top_k]
    gates = _gates(logits, expert_index, renormalize)  # [tokens, top_k]
    if sinkhorn_mask is not False:
        log_plan = sinkhorn_log_plan(
            logits, top_k=top_k, num_iters=num_iters, tolerance=tolerance
        )  # [tokens, experts]
        _, plan_index = jax.lax.top_k(log_plan, top_k)  # [tokens, top_k]
        plan_gates = _gates(
            logits if gate_source == "softmax" else log_plan, plan_index, renormalize
        )
        if sinkhorn_mask is None:
            expert_index, gates = plan_index, plan_gates
        else:
            expert_index = jnp.where(sinkhorn_mask[:, None], plan_index, expert_index)
            gates = jnp.where(sinkhorn_mask[:, None], plan_gates, gates)
    expert_index = expert_index.astype(jnp.int32)
    load_balance = load_balance_loss(router_probs, expert_index)
    router_z = router_z_loss(logits)
    aux_losses = {
        "load_balance": jnp.zeros((), jnp.float32),
        "load_balance_unweighted": load_balance,
        "router_z": router_z,
    }
    if replaces_z_loss:
        aux_losses["router_z"] = jnp.zeros((), jnp.float32)
        aux_losses["router_z_unweighted"] = router_z
    return Routing(
        expert_index=expert_index,
        combine_weights=gates,
        router_probs=router_probs,
        aux_losses=aux_losses,
    )


def _gates(gate_logits: jax.Array, expert_index: jax.Array, renormalize: bool) -> jax.Array:
    """Softmax of `gate_logits` [tokens, experts] at `expert_index` [tokens, top_k].

    Renormalised gates are a softmax over the chosen logits alone: the plan may pick experts
    whose full-softmax probabilities underflow to 0, and dividing those by their sum would give
    NaN, while the chosen logits' own softmax always has a largest term >= 1 / top_k.
    """
    if renormalize:
        chosen = jnp.take_along_axis(gate_logits, expert_index, axis=-1)  # [tokens, top_k]
        return jax.nn.softmax(chosen, axis=-1)
    probs = jax.nn.softmax(gate_logits, axis=-1)  # [tokens, experts]
    return jnp.take_along_axis(probs, expert_index, axis=-1)  # [tokens, top_k]


def check_options(num_iters: int, tolerance: float) -> None:
    require(isinstance(num_iters, int) and num_iters >= 1, "num_iters", num_iters, "an int >= 1")
    require(math.isfinite(tolerance) and tolerance >= 0, "tolerance", tolerance, "finite and >= 0")


SPEC = register(
    RouterSpec("sinkhorn", sinkhorn, needs=("router_logits", "train"), options=TopKOptions)
)
