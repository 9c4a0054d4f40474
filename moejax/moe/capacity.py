"""The "capacity" dispatch strategy: fixed expert buffers, overflowing assignments dropped.

Lepikhin et al., "GShard" (2020); Fedus et al., "Switch Transformers" (2021); the priority
option is Riquelme et al., "Scaling Vision with Sparse Mixture of Experts" (2021), and the
schedule over depth Gülmez, "DynaMoE" (2026).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax.errors import require, require_config, require_one_of
from moejax.moe import _rows
from moejax.moe.capacity_factors import CAPACITY_SCHEDULES, capacity_schedule, expert_capacity
from moejax.moe.dispatch import DispatchOptions, DispatchSpec, check_inputs, register
from moejax.moe.experts import ExpertParams, batched_matmul, einsum, expert_swiglu
from moejax.routers.base import Routing

# Who gets an expert's buffer slots first when capacity is short: see `capacity_dispatch`.
CAPACITY_PRIORITIES = ("order", "score")
_OPTIONS = "model.moe.dispatch.options"


@dataclasses.dataclass(frozen=True)
class CapacityOptions(DispatchOptions):
    """Options of the "capacity" strategy."""

    # Expert buffer size over an even share of the tokens.
    capacity_factor: float = 1.25
    # Capacity factor at evaluation (V-MoE evaluates with a larger one); 0 keeps capacity_factor.
    eval_capacity_factor: float = 0.0
    # Which assignments keep their slot when an expert is full: "order" (token order, GShard)
    # or "score" (highest router weight first: batch-prioritised routing, V-MoE).
    priority: str = "order"
    # Expert capacity over depth (DynaMoE): "uniform", "descending", "ascending" or "pyramid"
    # around capacity_factor, within capacity_factor * [1 - schedule_spread, 1 + schedule_spread].
    schedule: str = "uniform"
    # In [0, 1).
    schedule_spread: float = 0.5
    layer_fields = ("schedule", "schedule_spread")

    def __post_init__(self) -> None:
        require_config(
            self.capacity_factor > 0,
            f"{_OPTIONS}.capacity_factor",
            self.capacity_factor,
            "a positive number",
        )
        require_config(
            self.eval_capacity_factor >= 0,
            f"{_OPTIONS}.eval_capacity_factor",
            self.eval_capacity_factor,
            f">= 0 (0 keeps {_OPTIONS}.capacity_factor)",
        )
        require_one_of(f"{_OPTIONS}.priority", self.priority, CAPACITY_PRIORITIES)
        require_one_of(f"{_OPTIONS}.schedule", self.schedule, CAPACITY_SCHEDULES)
        require_config(
            0.0 <= self.schedule_spread < 1.0,
            f"{_OPTIONS}.schedule_spread",
            self.schedule_spread,
            "in [0, 1)",
        )

    def at_depth(self, position: int, count: int) -> CapacityOptions:
        """The training capacity factor of the `position`-th of `count` MoE layers under the
        schedule; the schedule then reads "uniform" (it is applied)."""
        factors = capacity_schedule(
            count, self.capacity_factor, self.schedule, self.schedule_spread
        )
        return dataclasses.replace(self, capacity_factor=factors[position], schedule="uniform")


def capacity_dispatch(
    x: jax.Array,
    routing: Routing,
    expert_params: ExpertParams,
    *,
    capacity: int,
    priority: str = "order",
) -> tuple[jax.Array, jax.Array]:
    """Fixed-capacity expert buffers filled and emptied by row gathers.

    Lepikhin et al., "GShard" (2020); Fedus et al., "Switch Transformers" (2021). Assignments
    take buffer slots in priority order: every token's first choice before any second choice, and
    within one choice rank the tokens in the order `priority` picks. Assignments that find their
    expert's `capacity` slots full are dropped: they contribute zero and are counted. The buffers
    are [experts, capacity, d_model], the fixed shape that expert parallelism exchanges; they are
    filled by gathering each slot's token row and emptied by gathering each assignment's slot
    (`_rows.dispatch_rows`, `_rows.collect_rows`), so the cost grows with tokens * top_k *
    d_model, not with the tokens * experts * capacity of one-hot dispatch einsums.

    `priority="order"` ranks tokens by position. `priority="score"` is Batch Prioritized Routing
    from Riquelme et al., "Scaling Vision with Sparse Mixture of Experts" (2021): tokens are
    ranked by their priority score, the largest of their combine weights, in decreasing order
    (ties by position), and that one ranking orders every choice rank, as V-MoE's
    implementation does. When capacity is short the tokens the router is surest about survive.
    The score is a combine weight, so renormalised top-1 weights (all 1) rank by position: use
    raw probabilities (`renormalize=False`), as Switch and V-MoE do.

    Args:
      x: [tokens, d_model].
      routing: expert_index and combine_weights [tokens, top_k].
      expert_params: see `moejax.moe.experts`.
      capacity: slots per expert (see `expert_capacity`).
      priority: one of `CAPACITY_PRIORITIES`.

    Returns:
      y: [tokens, d_model] in x's dtype, and dropped_fraction: scalar float32.
    """
    num_experts = check_inputs(x, routing, expert_params)
    require(priority in CAPACITY_PRIORITIES, "priority", priority, ", ".join(CAPACITY_PRIORITIES))
    require(capacity >= 1, "capacity", capacity, ">= 1")
    slot = _SLOTS_BY_PRIORITY[priority](routing, num_experts)  # [tokens, top_k]
    kept = slot < capacity  # [tokens, top_k]
    dropped_fraction = jnp.mean((~kept).astype(jnp.float32))
    num_slots = num_experts * capacity
    # A dropped assignment's row is num_slots, past the last buffer row: it reads zeros there and
    # fills no slot.
    buffer_row = jnp.where(kept, routing.expert_index * capacity + slot, num_slots)  # [t, k]
    rows = _rows.SlotRows.build(buffer_row, num_slots)

    expert_inputs = _rows.dispatch_rows(x, rows)  # [experts*capacity, d_model]
    expert_inputs = expert_inputs.reshape(num_experts, capacity, -1)  # [e, capacity, d_model]
    expert_outputs = expert_swiglu(expert_inputs, expert_params, batched_matmul)  # [e, c, d]
    out = _rows.collect_rows(expert_outputs.reshape(num_slots, -1), rows)  # [tokens, k, d]
    y = einsum("tkd,tk->td", out, routing.combine_weights.astype(x.dtype))  # [tokens, d_model]
    return y, dropped_fraction


def _slots_in_token_order(routing: Routing, num_experts: int) -> jax.Array:
    """Buffer positions `[tokens, top_k]` with tokens ranked by position (GShard)."""
    return _buffer_slots(routing.expert_index, num_experts)


def _slots_by_score(routing: Routing, num_experts: int) -> jax.Array:
    """Buffer positions `[tokens, top_k]` with tokens ranked by their largest combine weight
    (Batch Prioritized Routing, V-MoE)."""
    score = jnp.max(routing.combine_weights.astype(jnp.float32), axis=-1)  # [tokens]
    # Stable, so equal scores keep token order (and "score" with equal weights is "order").
    ranking = jnp.argsort(-score, stable=True)  # [tokens], best first
    ranked_slot = _buffer_slots(routing.expert_index[ranking], num_experts)  # [tokens, k]
    return _rows.unpermute(ranked_slot, ranking)  # [tokens, top_k], back in token order


def _buffer_slots(expert_index: jax.Array, num_experts: int) -> jax.Array:
    """Each assignment's position in its expert's buffer, first choices of all tokens first.

    Args:
      expert_index: [tokens, top_k] int, tokens in priority order.
      num_experts: experts routed over.

    Returns:
      [tokens, top_k] int32; positions >= capacity are the dropped assignments.
    """
    # Choice-major order ([top_k * tokens]) ranks every first choice before any second choice.
    choice_major = expert_index.T.reshape(-1)  # [k*tokens]
    return _rows.rank_within_expert(choice_major, num_experts).reshape(expert_index.T.shape).T


def _capacity(
    x: jax.Array,
    routing: Routing,
    expert_params: ExpertParams,
    *,
    train: bool,
    capacity_factor: float,
    eval_capacity_factor: float,
    priority: str,
) -> tuple[jax.Array, jax.Array]:
    """The strategy: `capacity_dispatch` with the capacity of this mode's factor."""
    if not train and eval_capacity_factor:
        capacity_factor = eval_capacity_factor
    num_tokens, top_k = routing.expert_index.shape
    num_experts = expert_params["w_gate"].shape[0]
    capacity = expert_capacity(num_tokens, num_experts, top_k, capacity_factor)
    return capacity_dispatch(x, routing, expert_params, capacity=capacity, priority=priority)


# The buffers are plain gathers and einsums, so the compiler partitions them over any mesh.
CAPACITY = register(
    DispatchSpec(
        name="capacity",
        dispatch=_capacity,
        options=CapacityOptions,
        needs=("train",),
        expert_shards="any",
        drops=True,
    )
)


# How each `CAPACITY_PRIORITIES` entry ranks the assignments for buffer slots.
_SLOTS_BY_PRIORITY = {"order": _slots_in_token_order, "score": _slots_by_score}
