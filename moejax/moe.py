"""Mixture-of-experts feed-forward math: SwiGLU experts and interchangeable dispatch strategies.

Every strategy maps `(x [tokens, d_model], routing, expert_params) -> y [tokens, d_model]` and
all agree when no assignment is dropped. Expert parameters are a dict

    {"w_gate": [experts, d_model, d_ff], "w_up": [experts, d_model, d_ff],
     "w_down": [experts, d_ff, d_model]}

and each expert is the SwiGLU MLP `(silu(x @ w_gate) * (x @ w_up)) @ w_down` of Shazeer,
"GLU Variants Improve Transformer" (2020). Shared experts, which every token passes through, take
the same dict with a leading [num_shared] axis. Computation runs in x's dtype (parameters are cast
to it, as a Flax layer's `dtype` does) with matmuls accumulated in at least float32.

`moe_ffn` takes one `capacity_factor`; a layer that wants different factors for training and
evaluation (V-MoE evaluates with a larger one) passes the one for its mode.
"""

import dataclasses

import jax
import jax.numpy as jnp

from kernels_pallas import gmm
from moejax import expert_parallel
from moejax.parallel import sharding
from moejax.routers.base import Routing, expert_capacity

ExpertParams = dict[str, jax.Array]

# "expert_parallel" is "dropless" with the expert mesh axis exchanging tokens by all-to-all
# (`moejax.expert_parallel`); "dropless" becomes it when the expert axis is larger than 1.
DISPATCH_STRATEGIES = ("capacity", "dropless", "expert_parallel")
# Who gets an expert's buffer slots first when capacity is short: see `capacity_dispatch`.
CAPACITY_PRIORITIES = ("order", "score")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoEOutput:
    """Result of `moe_ffn`.

    Attributes:
      y: [tokens, d_model], same dtype as the input.
      dropped_fraction: scalar float32, share of the tokens * top_k assignments that were
        dropped for lack of expert capacity (always 0 for "dropless").
    """

    y: jax.Array
    dropped_fraction: jax.Array


def init_expert_params(
    key: jax.Array, num_experts: int, d_model: int, d_ff: int, dtype: jnp.dtype = jnp.float32
) -> ExpertParams:
    """Random SwiGLU expert weights, normal with std 1/sqrt(fan_in) (see the module docstring
    for the shapes); for benchmarks and tests that need experts without a Flax module."""
    keys = jax.random.split(key, 3)
    shape_in, shape_out = (num_experts, d_model, d_ff), (num_experts, d_ff, d_model)
    return {
        "w_gate": jax.random.normal(keys[0], shape_in, dtype) * d_model**-0.5,
        "w_up": jax.random.normal(keys[1], shape_in, dtype) * d_model**-0.5,
        "w_down": jax.random.normal(keys[2], shape_out, dtype) * d_ff**-0.5,
    }


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
    (`_dispatch_rows`, `_collect_rows`), so the cost grows with tokens * top_k * d_model, not
    with the tokens * experts * capacity of one-hot dispatch einsums.

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
      expert_params: see the module docstring.
      capacity: slots per expert (see `expert_capacity`).
      priority: one of `CAPACITY_PRIORITIES`.

    Returns:
      y: [tokens, d_model] in x's dtype, and dropped_fraction: scalar float32.
    """
    num_experts = _check_inputs(x, routing, expert_params)
    _check_priority(priority)
    if capacity < 1:
        raise ValueError(f"capacity: got {capacity}; allowed: >= 1")
    if priority == "order":
        slot = _buffer_slots(routing.expert_index, num_experts)  # [tokens, top_k]
    else:
        score = jnp.max(routing.combine_weights.astype(jnp.float32), axis=-1)  # [tokens]
        # Stable, so equal scores keep token order (and "score" with equal weights is "order").
        ranking = jnp.argsort(-score, stable=True)  # [tokens], best first
        ranked_slot = _buffer_slots(routing.expert_index[ranking], num_experts)  # [tokens, k]
        slot = _unpermute(ranked_slot, ranking)  # [tokens, top_k], back in token order
    kept = slot < capacity  # [tokens, top_k]
    dropped_fraction = jnp.mean((~kept).astype(jnp.float32))
    num_slots = num_experts * capacity
    # A dropped assignment's row is num_slots, past the last buffer row: it reads zeros there and
    # fills no slot.
    buffer_row = jnp.where(kept, routing.expert_index * capacity + slot, num_slots)  # [t, k]
    rows = _SlotRows.build(buffer_row, num_slots)

    expert_inputs = _dispatch_rows(x, rows)  # [experts*capacity, d_model]
    expert_inputs = expert_inputs.reshape(num_experts, capacity, -1)  # [e, capacity, d_model]
    expert_outputs = _swiglu_batched(expert_inputs, expert_params)  # [e, capacity, d_model]
    out = _collect_rows(expert_outputs.reshape(num_slots, -1), rows)  # [tokens, k, d_model]
    y = _einsum("tkd,tk->td", out, routing.combine_weights.astype(x.dtype))  # [tokens, d_model]
    return y, dropped_fraction


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
    return _rank_within_expert(choice_major, num_experts).reshape(expert_index.T.shape).T


def _rank_within_expert(expert: jax.Array, num_experts: int) -> jax.Array:
    """[n] int32: how many of the entries before each one chose the same expert.

    A stable sort by expert lists each expert's entries in their order; an entry's rank is its
    sorted position less its expert's first one.
    """
    order = jnp.argsort(expert, stable=True)  # [n]
    counts = jnp.bincount(expert, length=num_experts)  # [experts]
    first = (jnp.cumsum(counts) - counts).astype(jnp.int32)  # [experts]
    sorted_rank = jnp.arange(expert.shape[0], dtype=jnp.int32) - first[expert[order]]  # [n]
    return _unpermute(sorted_rank, order)


def _unpermute(values: jax.Array, order: jax.Array) -> jax.Array:
    """values[i] returned to position order[i]: the inverse of `values = original[order]`."""
    return jnp.zeros_like(values).at[order].set(values, unique_indices=True)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _SlotRows:
    """Where each routing assignment sits among the expert rows, both ways round.

    Attributes:
      buffer_row: [tokens, top_k] int32, the expert row of each assignment; rows past the last
        (num_rows or more) mean dropped.
      assignment: [num_rows] int32, the token-major assignment (token * top_k + choice) each row
        holds; tokens * top_k marks an empty row.
    """

    buffer_row: jax.Array
    assignment: jax.Array

    @classmethod
    def build(cls, buffer_row: jax.Array, num_rows: int) -> "_SlotRows":
        """From each assignment's row; no two kept assignments may share one."""
        num_assignments = buffer_row.size
        assignment = jnp.full((num_rows,), num_assignments, jnp.int32)
        ids = jnp.arange(num_assignments, dtype=jnp.int32)
        assignment = assignment.at[buffer_row.reshape(-1)].set(ids, mode="drop")  # [rows]
        return cls(buffer_row.astype(jnp.int32), assignment)


def _gather_rows(rows: jax.Array, index: jax.Array) -> jax.Array:
    """rows[index] for [n, d] rows and [m] indices; zeros where an index is n or more."""
    return rows.at[index].get(mode="fill", fill_value=0)


# Filling expert rows and collecting them back are each other's transposes, and both are row
# gathers: custom VJPs keep the backward pass a gather too, where autodiff would emit scatter-adds.
@jax.custom_vjp
def _dispatch_rows(x: jax.Array, rows: _SlotRows) -> jax.Array:
    """x [tokens, d_model] -> [num_rows, d_model]: each row its assignment's token, or zeros."""
    top_k = rows.buffer_row.shape[1]
    return _gather_rows(x, rows.assignment // top_k)


def _dispatch_rows_fwd(x: jax.Array, rows: _SlotRows) -> tuple[jax.Array, _SlotRows]:
    return _dispatch_rows(x, rows), rows


def _dispatch_rows_bwd(rows: _SlotRows, d_rows: jax.Array) -> tuple[jax.Array, None]:
    # A token's gradient is the sum of its assignments' rows' gradients.
    per_assignment = _collect_rows(d_rows, rows)  # [tokens, top_k, d_model]
    accumulate_dtype = jnp.promote_types(d_rows.dtype, jnp.float32)
    return jnp.sum(per_assignment, axis=1, dtype=accumulate_dtype).astype(d_rows.dtype), None


_dispatch_rows.defvjp(_dispatch_rows_fwd, _dispatch_rows_bwd)


@jax.custom_vjp
def _collect_rows(expert_rows: jax.Array, rows: _SlotRows) -> jax.Array:
    """[num_rows, d_model] -> [tokens, top_k, d_model]: each assignment's row, zeros if dropped."""
    num_tokens, top_k = rows.buffer_row.shape
    collected = _gather_rows(expert_rows, rows.buffer_row.reshape(-1))  # [tokens*k, d_model]
    return collected.reshape(num_tokens, top_k, -1)


def _collect_rows_fwd(expert_rows: jax.Array, rows: _SlotRows) -> tuple[jax.Array, _SlotRows]:
    return _collect_rows(expert_rows, rows), rows


def _collect_rows_bwd(rows: _SlotRows, d_out: jax.Array) -> tuple[jax.Array, None]:
    # Each row has at most one assignment, so its gradient is that assignment's, or zero.
    return _gather_rows(d_out.reshape(-1, d_out.shape[-1]), rows.assignment), None


_collect_rows.defvjp(_collect_rows_fwd, _collect_rows_bwd)


def dropless_dispatch(
    x: jax.Array, routing: Routing, expert_params: ExpertParams, *, gmm_impl: str = "auto"
) -> tuple[jax.Array, jax.Array]:
    """Sort assignments by expert and run every expert with grouped matmuls; nothing is dropped.

    Gale et al., "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts" (2022). The
    tokens * top_k assignments are stably sorted by expert, their rows gathered, the SwiGLU run
    as three `kernels_pallas.gmm` calls, and each token's outputs gathered back and summed with
    the combine weights. Shapes are static, so it jits; it differentiates in x, the expert
    parameters and the combine weights.

    Args:
      x: [tokens, d_model].
      routing: expert_index and combine_weights [tokens, top_k].
      expert_params: see the module docstring.
      gmm_impl: `impl` passed to `kernels_pallas.gmm`.

    Returns:
      y: [tokens, d_model] in x's dtype, and dropped_fraction: scalar float32, always 0.
    """
    num_experts = _check_inputs(x, routing, expert_params)
    params = _cast_params(expert_params, x.dtype)
    flat_expert = routing.expert_index.reshape(-1)  # [tokens*k], token-major
    group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)  # [experts]
    # Each expert's rows in token order: a row is its expert's first row plus its rank.
    first_row = jnp.cumsum(group_sizes) - group_sizes  # [experts]
    sorted_row = first_row[flat_expert] + _rank_within_expert(flat_expert, num_experts)
    rows = _SlotRows.build(sorted_row.reshape(routing.expert_index.shape), flat_expert.size)

    sorted_rows = _dispatch_rows(x, rows)  # [tokens*k, d_model]
    gate = gmm(sorted_rows, params["w_gate"], group_sizes, impl=gmm_impl)  # [tokens*k, d_ff]
    up = gmm(sorted_rows, params["w_up"], group_sizes, impl=gmm_impl)  # [tokens*k, d_ff]
    hidden = jax.nn.silu(gate) * up
    sorted_out = gmm(hidden, params["w_down"], group_sizes, impl=gmm_impl)  # [tokens*k, d_model]

    out = _collect_rows(sorted_out, rows)  # [tokens, k, d_model]
    y = _einsum("tkd,tk->td", out, routing.combine_weights.astype(x.dtype))  # [tokens, d_model]
    return y, jnp.zeros((), jnp.float32)


def shared_expert_ffn(x: jax.Array, shared_params: ExpertParams) -> jax.Array:
    """Shared experts: SwiGLU experts that every token passes through, summed.

    Dai et al., "DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts
    Language Models" (2024) isolate a few always-active shared experts so that knowledge every
    token needs is not learned again by each routed expert. Their output is added, unweighted,
    to the routed experts'.

    Args:
      x: [tokens, d_model].
      shared_params: {"w_gate": [num_shared, d_model, d_ff], "w_up": [num_shared, d_model, d_ff],
        "w_down": [num_shared, d_ff, d_model]}; d_ff may differ from the routed experts'.

    Returns:
      [tokens, d_model] in x's dtype: the sum over shared experts of each one's SwiGLU.
    """
    _check_x(x)
    _check_params(x, shared_params, "shared_params", "num_shared")
    params = _cast_params(shared_params, x.dtype)
    gate = _einsum("td,sdf->stf", x, params["w_gate"])  # [shared, tokens, d_ff]
    up = _einsum("td,sdf->stf", x, params["w_up"])  # [shared, tokens, d_ff]
    hidden = jax.nn.silu(gate) * up
    # Contracting the shared axis with d_ff sums the experts inside one float32 accumulation.
    return _einsum("stf,sfd->td", hidden, params["w_down"])  # [tokens, d_model]


def moe_ffn(
    x: jax.Array,
    routing: Routing,
    expert_params: ExpertParams,
    *,
    strategy: str,
    capacity_factor: float = 1.25,
    gmm_impl: str = "auto",
    exchange: str = "auto",
    expert_balance: str = "none",
    llep_margin: float = 0.1,
    llep_max_foreign: int = 2,
    priority: str = "order",
    shared_params: ExpertParams | None = None,
) -> MoEOutput:
    """The routed-experts feed-forward block with a dispatch strategy chosen by name.

    Args:
      x: [tokens, d_model].
      routing: from a router in `moejax.routers`.
      expert_params: see the module docstring.
      strategy: one of `DISPATCH_STRATEGIES`. Traced under a mesh of several devices, "dropless"
        and "expert_parallel" run inside `jax.shard_map` (`expert_parallel.sharded_dropless`),
        exchanging tokens over the expert axis when it is larger than 1; otherwise both are
        `dropless_dispatch`.
      capacity_factor: slots per expert relative to a perfectly balanced load ("capacity" only).
      gmm_impl: grouped matmul implementation ("dropless" and "expert_parallel").
      exchange: how tokens travel between expert shards, one of `expert_parallel.EXCHANGES`
        ("dropless" and "expert_parallel" with more than one expert shard).
      expert_balance, llep_margin, llep_max_foreign: load balancing over expert shards, one of
        `expert_parallel.EXPERT_BALANCES` ("dropless" and "expert_parallel" with more than one
        expert shard; see `expert_parallel.sharded_dropless`). Outputs do not depend on them.
      priority: who keeps buffer slots when capacity is short, one of `CAPACITY_PRIORITIES`
        ("capacity" only; see `capacity_dispatch`).
      shared_params: shared experts added for every token (see `shared_expert_ffn`), or None.

    Returns:
      `MoEOutput` with y [tokens, d_model] and the dropped fraction.
    """
    if strategy not in DISPATCH_STRATEGIES:
        raise ValueError(
            f"strategy: unknown value {strategy!r}; allowed: {', '.join(DISPATCH_STRATEGIES)}"
        )
    _check_priority(priority)
    expert_parallel.check_balance(expert_balance, llep_margin, llep_max_foreign)
    num_experts = _check_inputs(x, routing, expert_params)
    if strategy == "capacity":
        num_tokens, top_k = routing.expert_index.shape
        capacity = expert_capacity(num_tokens, num_experts, top_k, capacity_factor)
        y, dropped_fraction = capacity_dispatch(
            x, routing, expert_params, capacity=capacity, priority=priority
        )
    elif (mesh := sharding.kernel_mesh()) is not None:
        y = expert_parallel.sharded_dropless(
            x,
            routing.expert_index,
            routing.combine_weights,
            _cast_params(expert_params, x.dtype),
            mesh,
            gmm_impl=gmm_impl,
            exchange=exchange,
            expert_balance=expert_balance,
            llep_margin=llep_margin,
            llep_max_foreign=llep_max_foreign,
        )
        dropped_fraction = jnp.zeros((), jnp.float32)
    else:
        y, dropped_fraction = dropless_dispatch(x, routing, expert_params, gmm_impl=gmm_impl)
    if shared_params is not None:
        y = y + shared_expert_ffn(x, shared_params)
    return MoEOutput(y=y, dropped_fraction=dropped_fraction)


def _swiglu_batched(expert_inputs: jax.Array, expert_params: ExpertParams) -> jax.Array:
    """Every expert on its own buffer: [experts, capacity, d_model] -> same shape."""
    params = _cast_params(expert_params, expert_inputs.dtype)
    gate = _einsum("ecd,edf->ecf", expert_inputs, params["w_gate"])  # [experts, capacity, d_ff]
    up = _einsum("ecd,edf->ecf", expert_inputs, params["w_up"])  # [experts, capacity, d_ff]
    hidden = jax.nn.silu(gate) * up
    return _einsum("ecf,efd->ecd", hidden, params["w_down"])  # [experts, capacity, d_model]


def _einsum(spec: str, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """einsum accumulated in at least float32 and returned in lhs's dtype, like `gmm`."""
    accumulate_dtype = jnp.promote_types(lhs.dtype, jnp.float32)
    return jnp.einsum(spec, lhs, rhs, preferred_element_type=accumulate_dtype).astype(lhs.dtype)


def _cast_params(expert_params: ExpertParams, dtype: jnp.dtype) -> ExpertParams:
    return {name: expert_params[name].astype(dtype) for name in ("w_gate", "w_up", "w_down")}


def _check_priority(priority: str) -> None:
    if priority not in CAPACITY_PRIORITIES:
        raise ValueError(
            f"priority: unknown value {priority!r}; allowed: {', '.join(CAPACITY_PRIORITIES)}"
        )


def _check_x(x: jax.Array) -> None:
    if x.ndim != 2:
        raise ValueError(f"x: expected [tokens, d_model], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x: dtype must be floating, got {x.dtype}")


def _check_params(x: jax.Array, params: ExpertParams, field: str, axis: str) -> int:
    """Validates stacked SwiGLU weights `field` against x and returns their leading size."""
    missing = {"w_gate", "w_up", "w_down"} - set(params)
    if missing:
        raise ValueError(f"{field}: missing {sorted(missing)}; got {sorted(params)}")
    if params["w_gate"].ndim != 3:
        raise ValueError(
            f"{field}['w_gate']: expected [{axis}, d_model, d_ff], "
            f"got shape {params['w_gate'].shape}"
        )
    d_model = x.shape[1]
    num_stacked, _, d_ff = params["w_gate"].shape
    expected = {
        "w_gate": (num_stacked, d_model, d_ff),
        "w_up": (num_stacked, d_model, d_ff),
        "w_down": (num_stacked, d_ff, d_model),
    }
    for name, shape in expected.items():
        if params[name].shape != shape:
            raise ValueError(
                f"{field}[{name!r}]: expected shape {shape} for x of shape {x.shape}, "
                f"got {params[name].shape}"
            )
    return num_stacked


def _check_inputs(x: jax.Array, routing: Routing, expert_params: ExpertParams) -> int:
    """Validates shapes shared by every strategy and returns num_experts."""
    _check_x(x)
    num_experts = _check_params(x, expert_params, "expert_params", "experts")
    num_tokens = x.shape[0]
    if routing.expert_index.ndim != 2 or routing.expert_index.shape[0] != num_tokens:
        raise ValueError(
            f"routing.expert_index: expected [tokens={num_tokens}, top_k], "
            f"got shape {routing.expert_index.shape}"
        )
    if routing.combine_weights.shape != routing.expert_index.shape:
        raise ValueError(
            f"routing.combine_weights: shape {routing.combine_weights.shape} differs from "
            f"expert_index's {routing.expert_index.shape}"
        )
    return num_experts
