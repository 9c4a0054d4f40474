"""The "llep" dispatch strategy: expert parallelism whose shards share the load of hot experts.

"Least-Loaded Expert Parallelism: Load Balancing An Imbalanced MoE". Under plain expert
parallelism the shard that owns an expert computes all of its rows, so skewed routing leaves one
shard doing most of the work. LLEP moves the excess rows of overloaded shards, together with the
weights of their experts, to shards with spare capacity; each row is still computed once, by a
copy of the same expert, so the outputs are those of plain expert parallelism.

LLEP is a strategy of its own rather than an option of "expert_parallel": its `margin` and
`max_foreign` mean nothing to plain expert parallelism, and with each strategy's options nested
under its name they exist only when it is chosen. The shard_map and both exchanges are shared
(`moejax.moe._sharded`); what LLEP adds is a `Balance`, the plan below.

The plan is a pure function of the count matrix `all_counts [shards, experts]` (rows each source
shard sends to each expert), which every expert shard holds after one all-gather, so each shard
computes the same plan without further communication. Experts are split consecutively over the
shards: shard r owns experts [r * local, (r + 1) * local).

Expert e's *stream* is its rows in a fixed order: by source shard, then by the source's token
order. A shard's *owned stream* is its experts' streams in expert order.

    total = sum of all_counts;  cap = ceil(total / shards) + floor(margin * total / shards)
    each owner keeps the first min(load, cap) rows of its owned stream;
    the rest, in expert order, is the *excess stream*;
    shards with spare = cap - load > 0, in shard order, take consecutive runs of it: `spare`
      rows each (water-filling; their runs cover the excess since shards * cap >= total);
    the rows of a run belong to a few consecutive experts; the first `max_foreign` of them are
      *borrowed* (the worker receives their weights into one slot each), the rows of any further
      expert stay with its owner.

Guarantee on the loads (rows each shard's experts compute): cap <= ceil((1 + margin) * total /
shards), every shard that borrows stays at or below cap, and no shard ever computes more than
under plain expert parallelism. When no run spans more than `max_foreign` experts every shard is
at or below cap; that always holds for max_foreign >= experts - experts per shard (a run only
holds experts of overloaded owners), and with a few overloaded experts a small bound suffices.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels_pallas.varying import vary_together
from moejax.errors import require, require_config
from moejax.moe import _sharded
from moejax.moe.dispatch import DispatchOptions, DispatchSpec, register
from moejax.moe.experts import ExpertParams
from moejax.routers.base import Routing

EXPERT_AXIS = _sharded.EXPERT_AXIS
_OPTIONS = "model.moe.dispatch.options"


@dataclasses.dataclass(frozen=True)
class LLEPOptions(DispatchOptions):
    """Options of the "llep" strategy."""

    # The grouped matmul implementation, `impl` of kernels_pallas.gmm.
    gmm_impl: str = "auto"
    # How rows travel between expert shards: "ragged", "padded" or "auto", as expert_parallel's.
    exchange: str = "auto"
    # How far above the mean load a shard may go before rows move, >= 0: the cap is
    # ceil((1 + margin) * mean load).
    margin: float = 0.1
    # Most borrowed experts one shard runs per step, a static int >= 1.
    max_foreign: int = 2

    def __post_init__(self) -> None:
        _sharded.check_options(self, _OPTIONS)
        require_config(self.margin >= 0, f"{_OPTIONS}.margin", self.margin, ">= 0")
        require_config(
            isinstance(self.max_foreign, int) and self.max_foreign >= 1,
            f"{_OPTIONS}.max_foreign",
            self.max_foreign,
            "an int >= 1",
        )


class LLEPPlan(NamedTuple):
    """Who computes what, identical on every shard. Shapes: shards S, experts E, local experts
    L = E / S, max_foreign F; the groups of a shard are its L own experts, then its F slots."""

    # [] int32: the load every shard should stay at or below.
    cap: jax.Array
    # [S, E] int32: where source s's rows of expert e start in e's stream.
    stream_start: jax.Array
    # [S, E] int32: worker r computes rows [segment_start, segment_end) of e's stream; equal
    # (zero) where r borrows nothing of e.
    segment_start: jax.Array
    segment_end: jax.Array
    # [S, E] int32: r's slot for expert e, or F where r does not borrow e.
    slot: jax.Array
    # [S, F] int32: the expert in r's slot j, or E for an empty slot.
    borrowed_expert: jax.Array
    # [S (source), S (destination), L + F] int32: rows source s sends to each group of shard r.
    traffic: jax.Array

    @property
    def loads(self) -> jax.Array:
        """[S] int32: rows each shard's groups compute."""
        return jnp.sum(self.traffic, axis=(0, 2))


def load_cap(total: jax.Array, shards: int, margin: float) -> jax.Array:
    """ceil(total / shards) + floor(margin * total / shards) as int32, margin in float32.

    At least the mean load rounded up, so shards * cap >= total, and at most
    ceil((1 + margin) * total / shards)."""
    total = jnp.asarray(total, jnp.int32)
    ceil_mean = (total + shards - 1) // shards
    slack = jnp.floor(jnp.float32(margin) * total.astype(jnp.float32) / jnp.float32(shards))
    return ceil_mean + slack.astype(jnp.int32)


def llep_plan(all_counts: jax.Array, *, margin: float, max_foreign: int) -> LLEPPlan:
    """The LLEP plan of a count matrix (see the module docstring).

    Args:
      all_counts: [shards, experts] int32, rows source shard s routes to expert e; experts a
        multiple of shards.
      margin: the load cap's slack over the mean load, >= 0.
      max_foreign: F, the static number of experts a shard can borrow, >= 1.

    Returns:
      `LLEPPlan`, all static shapes, so it runs inside jit and shard_map.
    """
    shards, num_experts = all_counts.shape
    local = num_experts // shards
    all_counts = all_counts.astype(jnp.int32)
    per_expert = jnp.sum(all_counts, axis=0)  # [E]
    cap = load_cap(jnp.sum(per_expert), shards, margin)
    owned = per_expert.reshape(shards, local)  # [S, L]
    owner_load = jnp.sum(owned, axis=1)  # [S]

    # Owners keep a prefix of their owned stream: expert e keeps what fits after the experts of
    # the same owner before it.
    before = jnp.cumsum(owned, axis=1) - owned  # [S, L]
    kept = jnp.clip(cap - before, 0, owned).reshape(num_experts)  # [E]
    excess = per_expert - kept  # [E]
    excess_start = jnp.cumsum(excess) - excess  # [E], e's place in the excess stream
    spare = jnp.maximum(cap - owner_load, 0)  # [S]
    run_end = jnp.cumsum(spare)  # [S]: worker r takes [run_end - spare, run_end)

    # Each expert's excess intersected with each worker's run, in excess-stream positions.
    low = jnp.maximum(excess_start[None, :], (run_end - spare)[:, None])  # [S, E]
    high = jnp.minimum((excess_start + excess)[None, :], run_end[:, None])  # [S, E]
    touches = high > low  # [S, E]
    rank = jnp.cumsum(touches, axis=1) - 1  # [S, E], the expert's place in r's run
    borrows = touches & (rank < max_foreign)  # [S, E]
    # Back to positions in e's own stream, whose excess starts after its kept prefix.
    shift = (kept - excess_start)[None, :]
    segment_start = jnp.where(borrows, low + shift, 0)
    segment_end = jnp.where(borrows, high + shift, 0)
    slot = jnp.where(borrows, rank, max_foreign)

    in_slot = borrows[:, None, :] & (rank[:, None, :] == jnp.arange(max_foreign)[None, :, None])
    borrowed_expert = jnp.where(
        jnp.any(in_slot, axis=2), jnp.argmax(in_slot, axis=2), num_experts
    ).astype(jnp.int32)  # [S, F]

    stream_start = jnp.cumsum(all_counts, axis=0) - all_counts  # [S, E]
    source_end = stream_start + all_counts
    moved = jnp.maximum(
        jnp.minimum(source_end[:, None, :], segment_end[None])
        - jnp.maximum(stream_start[:, None, :], segment_start[None]),
        0,
    )  # [S (source), S (worker), E]: source s's rows of e that worker r computes
    stays = all_counts - jnp.sum(moved, axis=1)  # [S, E], rows their owner computes
    slot_expert = jnp.minimum(borrowed_expert, num_experts - 1)  # [S, F]
    to_slots = jnp.take_along_axis(moved, slot_expert[None], axis=2)  # [S, S, F]
    to_slots = jnp.where(borrowed_expert[None] < num_experts, to_slots, 0)
    traffic = jnp.concatenate([stays.reshape(shards, shards, local), to_slots], axis=2)
    return LLEPPlan(
        cap=cap,
        stream_start=stream_start,
        segment_start=segment_start,
        segment_end=segment_end,
        slot=slot,
        borrowed_expert=borrowed_expert,
        traffic=traffic,
    )


def llep_balance(margin: float, max_foreign: int) -> _sharded.Balance:
    """The `Balance` of `_sharded.sharded_dropless` that follows the LLEP plan of each step's
    count matrix: rows grouped by destination shard, then by group there, and each shard's
    borrowed experts' weights appended to its own."""
    require(margin >= 0, "margin", margin, ">= 0")
    require(
        isinstance(max_foreign, int) and max_foreign >= 1, "max_foreign", max_foreign, "an int >= 1"
    )

    def route(all_counts, sorted_expert, counts, weights):
        plan = llep_plan(all_counts, margin=margin, max_foreign=max_foreign)
        regroup = _llep_order(sorted_expert, counts, plan)
        return regroup, _borrow_experts(plan.borrowed_expert, weights), plan.traffic

    def loads(all_counts):
        return llep_plan(all_counts, margin=margin, max_foreign=max_foreign).loads

    return _sharded.Balance(route=route, loads=loads)


def _llep_order(sorted_expert: jax.Array, counts: jax.Array, plan: LLEPPlan) -> jax.Array:
    """The permutation of this shard's rows, sorted by expert, that groups them as the plan's
    traffic says: by destination shard, then by group there (own experts, then borrowed slots),
    token order within a group.

    Args:
      sorted_expert: [m] the expert of each row, ascending.
      counts: [experts] this shard's rows per expert.
    """
    shards, num_experts = plan.slot.shape
    local = num_experts // shards
    max_foreign = plan.borrowed_expert.shape[1]
    me = jax.lax.axis_index(EXPERT_AXIS)
    first_row = jnp.cumsum(counts) - counts  # [experts]
    # A row's place in its expert's stream (by source shard, then token order).
    rank = jnp.arange(sorted_expert.shape[0]) - first_row[sorted_expert]  # [m]
    position = plan.stream_start[me][sorted_expert] + rank  # [m]
    inside = (plan.segment_start[:, sorted_expert] <= position) & (
        position < plan.segment_end[:, sorted_expert]
    )  # [shards, m]
    worker = jnp.argmax(inside, axis=0)  # [m]
    borrowed = jnp.any(inside, axis=0)
    destination = jnp.where(borrowed, worker, sorted_expert // local)
    group = jnp.where(borrowed, local + plan.slot[worker, sorted_expert], sorted_expert % local)
    return jnp.argsort(destination * (local + max_foreign) + group, stable=True)


def _borrow_experts(
    borrowed_expert: jax.Array, weights: tuple[jax.Array, ...]
) -> tuple[jax.Array, ...]:
    """Each shard's local expert weights followed by the weights of the experts it borrows.

    Every owner sends each borrower the slices of its borrowed experts with one `all_to_all`
    per weight over a static [shards, max_foreign, ...] buffer (zero where the slot's expert is
    not this owner's), so the owner receives their gradients back by the transposed all_to_all.
    That buffer is sent on every platform (XLA:CPU has no ragged all-to-all); it carries
    shards * max_foreign slices per owner, mostly zeros. On TPU/GPU a `ragged_all_to_all` of
    only the lent slices (owners know from the plan which and to whom) would send just those.

    Args:
      borrowed_expert: [shards, max_foreign] the plan's expert per slot, experts when empty.
      weights: [local, ...] arrays.

    Returns:
      the same arrays, [local + max_foreign, ...]: slot j holds expert borrowed_expert[me, j]
      (zeros for an empty slot, which gets no rows).
    """
    shards, max_foreign = borrowed_expert.shape
    local = weights[0].shape[0]
    me = jax.lax.axis_index(EXPERT_AXIS)
    owns = borrowed_expert // local == me  # [shards, max_foreign]
    source = jnp.clip(borrowed_expert - me * local, 0, local - 1)  # [shards, max_foreign]
    owner = jnp.minimum(borrowed_expert[me] // local, shards - 1)  # [max_foreign]
    extended = []
    for w in weights:
        # One cast to the plan's varying axes for both uses of w, so the backward pass sums its
        # gradient over the batch axes once.
        w, _ = vary_together(w, borrowed_expert)
        mask = owns.reshape(owns.shape + (1,) * (w.ndim - 1))
        outgoing = jnp.where(mask, w[source], 0)  # [shards, max_foreign, ...]
        incoming = jax.lax.all_to_all(outgoing, EXPERT_AXIS, 0, 0, tiled=True)  # [owners, F, ...]
        extended.append(jnp.concatenate([w, incoming[owner, jnp.arange(max_foreign)]]))
    return tuple(extended)


def _llep(
    x: jax.Array,
    routing: Routing,
    expert_params: ExpertParams,
    *,
    mesh: jax.sharding.AbstractMesh,
    gmm_impl: str,
    exchange: str,
    margin: float,
    max_foreign: int,
) -> tuple[jax.Array, jax.Array]:
    balance = llep_balance(margin, max_foreign)
    return _sharded.dispatch(
        x, routing, expert_params, mesh, gmm_impl=gmm_impl, exchange=exchange, balance=balance
    )


LLEP = register(
    DispatchSpec(
        name="llep",
        dispatch=_llep,
        options=LLEPOptions,
        needs=("mesh",),
        expert_shards="several",
    )
)
