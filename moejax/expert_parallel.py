"""Dropless mixture-of-experts over a device mesh: `jax.shard_map` with an explicit all-to-all.

The compiler cannot partition a `pallas_call`, so the grouped matmuls of a sharded step run
inside `jax.shard_map`, on each device's own tokens. With the `expert` mesh axis of size 1 every
device holds every expert and the dispatch is `moe.dropless_dispatch` on the local tokens. With
`n` expert shards each device holds `num_experts / n` consecutive experts, and (Lepikhin et al.,
"GShard" (2020); Gale et al., "MegaBlocks" (2022)):

    sort this device's token-expert assignments by expert     (so they are grouped by shard)
    exchange them over the expert axis                        (all-to-all: rows go to their shard)
    regroup what arrived by local expert, run the local experts with `kernels_pallas.gmm`
    send the results back the same way, unsort, weight and sum per token

Nothing is dropped, whatever the routing: every buffer is sized for the worst case, where all of
a device's assignments go to one shard. Two exchanges, one contract:

- "ragged": `jax.lax.ragged_all_to_all` sends each shard only its rows. TPU and GPU.
- "padded": `jax.lax.all_to_all` over one buffer per destination, each as large as all of this
  device's assignments, so n times the bytes of "ragged". It runs where ragged_all_to_all is not
  implemented (XLA:CPU), which is what the CPU tests exercise.

With `expert_balance="llep"` (Least-Loaded Expert Parallelism, `moejax.llep`), every expert
shard computes the same plan from the gathered count matrix: the excess rows of overloaded
shards go to shards with spare capacity instead of to their expert's owner, and each owner sends
the borrowed experts' weights along (`_borrow_experts`); a shard runs its own experts and its
borrowed slots in one grouped matmul. Both exchanges take the plan's traffic matrix (rows from
every source to every group of every shard), so they serve plain and balanced dispatch alike;
results come back to the rows' source shards as without it.

The other mesh axes: tokens are split over (data, fsdp, expert) as everywhere (the "batch" rule),
each (data, fsdp) group of devices exchanging among its own expert shards; the fsdp-sharded
d_model axis of the weights is gathered at the shard_map boundary (FSDP gathers weights for use,
never across experts); the tensor-sharded d_ff axis stays sharded and the partial outputs of
w_down are summed over "tensor" once per token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from kernels_pallas import gmm
from kernels_pallas.platform import target_platform
from kernels_pallas.varying import vary_together
from moejax import llep
from moejax.parallel import sharding

EXCHANGES = ("auto", "ragged", "padded")
# "none": plain expert parallelism; "llep": Least-Loaded Expert Parallelism (`moejax.llep`).
EXPERT_BALANCES = ("none", "llep")
EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"


def resolve_exchange(exchange: str) -> str:
    """ "ragged" on TPU and GPU, "padded" on CPU (no ragged_all_to_all there) for "auto"."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange: unknown value {exchange!r}; allowed: {', '.join(EXCHANGES)}")
    if exchange != "auto":
        return exchange
    return "padded" if target_platform() == "cpu" else "ragged"


def sharded_dropless(
    x: jax.Array,
    expert_index: jax.Array,
    combine_weights: jax.Array,
    expert_params: dict[str, jax.Array],
    mesh: jax.sharding.AbstractMesh,
    *,
    gmm_impl: str = "auto",
    exchange: str = "auto",
    expert_balance: str = "none",
    llep_margin: float = 0.1,
    llep_max_foreign: int = 2,
) -> jax.Array:
    """Dropless dispatch of batch-sharded tokens inside `jax.shard_map` over `mesh`.

    Args:
      x: [tokens, d_model], tokens sharded over the "batch" mesh axes.
      expert_index, combine_weights: [tokens, top_k], sharded like x.
      expert_params: {"w_gate", "w_up": [experts, d_model, d_ff], "w_down": [experts, d_ff,
        d_model]} in x's dtype; experts sharded over "expert", d_ff over "tensor".
      mesh: the mesh the step is traced under (`sharding.kernel_mesh()`).
      gmm_impl: `impl` of `kernels_pallas.gmm`.
      exchange: one of `EXCHANGES` (see the module docstring).
      expert_balance: one of `EXPERT_BALANCES`; "llep" moves the excess rows of overloaded
        expert shards, with their experts' weights, to shards with spare capacity
        (`moejax.llep`); the result is the same.
      llep_margin: the load cap's slack over the mean shard load ("llep").
      llep_max_foreign: experts one shard can borrow per step, a static bound ("llep").

    Returns:
      y: [tokens, d_model] in x's dtype, sharded like x: sum over k of
      combine_weights[t, k] * expert_{expert_index[t, k]}(x[t]).
    """
    num_experts = expert_params["w_gate"].shape[0]
    shards = mesh.shape[EXPERT_AXIS]
    if num_experts % shards:
        raise ValueError(
            f"num_experts: {num_experts} experts cannot be split over mesh axis "
            f"{EXPERT_AXIS!r} of size {shards}; allowed: a multiple of {shards}"
        )
    check_balance(expert_balance, llep_margin, llep_max_foreign)
    tokens = sharding.logical_to_mesh(("batch", None))
    weight_in = PartitionSpec(EXPERT_AXIS, None, TENSOR_AXIS)
    weight_out = PartitionSpec(EXPERT_AXIS, TENSOR_AXIS, None)
    local = functools.partial(
        _local_dispatch,
        num_experts=num_experts,
        gmm_impl=gmm_impl,
        exchange=resolve_exchange(exchange),
        balance=(expert_balance, llep_margin, llep_max_foreign),
    )
    run = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(tokens, tokens, tokens, weight_in, weight_in, weight_out),
        out_specs=tokens,
    )
    return run(
        x,
        expert_index,
        combine_weights,
        expert_params["w_gate"],
        expert_params["w_up"],
        expert_params["w_down"],
    )


def shard_loads(
    expert_index: jax.Array,
    num_experts: int,
    mesh: jax.sharding.AbstractMesh,
    *,
    expert_balance: str = "none",
    llep_margin: float = 0.1,
    llep_max_foreign: int = 2,
) -> jax.Array:
    """The rows each expert shard's grouped matmuls compute in `sharded_dropless` with the same
    arguments, from the same count matrix and plan.

    Args:
      expert_index: [tokens, top_k], sharded like `sharded_dropless`'s.

    Returns:
      [data * fsdp, expert shards] int32: per group of devices that exchange rows among
      themselves, the load of each of its expert shards.
    """
    check_balance(expert_balance, llep_margin, llep_max_foreign)

    def local(index: jax.Array) -> jax.Array:
        counts = jnp.bincount(index.reshape(-1), length=num_experts).astype(jnp.int32)
        all_counts = _count_matrix(counts)  # [shards, experts]
        if expert_balance == "llep":
            plan = llep.llep_plan(all_counts, margin=llep_margin, max_foreign=llep_max_foreign)
            return plan.loads[None]
        return llep.plain_loads(all_counts)[None]  # [1, shards]

    batch = sharding.logical_to_mesh(("batch", None))
    loads = jax.shard_map(local, mesh=mesh, in_specs=batch, out_specs=batch)(expert_index)
    # Every expert shard of a group computed the same row; keep one per group.
    return loads[:: mesh.shape[EXPERT_AXIS]]


def check_balance(expert_balance: str, llep_margin: float, llep_max_foreign: int) -> None:
    """ValueError naming the argument unless the balance options can work."""
    if expert_balance not in EXPERT_BALANCES:
        raise ValueError(
            f"expert_balance: unknown value {expert_balance!r}; allowed: "
            f"{', '.join(EXPERT_BALANCES)}"
        )
    if llep_margin < 0:
        raise ValueError(f"llep_margin: got {llep_margin!r}; allowed: >= 0")
    if llep_max_foreign < 1:
        raise ValueError(f"llep_max_foreign: got {llep_max_foreign!r}; allowed: an int >= 1")


def _local_dispatch(
    x: jax.Array,
    expert_index: jax.Array,
    combine_weights: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    num_experts: int,
    gmm_impl: str,
    exchange: str,
    balance: tuple[str, float, int],
) -> jax.Array:
    """One device's part: its tokens `x [t, d]` and its experts `w_* [experts / n, ...]`."""
    num_tokens, top_k = expert_index.shape
    flat_expert = expert_index.reshape(-1)  # [t*k], token-major
    # Stable: each expert's rows keep token order, so results do not depend on sort ties.
    order = jnp.argsort(flat_expert, stable=True)  # [t*k]
    counts = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)  # [experts]
    weights = (w_gate, w_up, w_down)

    if jax.lax.axis_size(EXPERT_AXIS) == 1:
        outputs = _experts(x[order // top_k], counts, *weights, gmm_impl)  # [t*k, d]
    else:
        all_counts = _count_matrix(counts)  # [shards, experts]
        expert_balance, margin, max_foreign = balance
        if expert_balance == "llep":
            plan = llep.llep_plan(all_counts, margin=margin, max_foreign=max_foreign)
            # Rows grouped by destination shard, then by group there.
            order = order[_llep_order(flat_expert[order], counts, plan)]
            weights = _borrow_experts(plan.borrowed_expert, weights)  # [local + F, ...] each
            traffic = plan.traffic  # [shards, shards, local + F]
        else:
            shards = all_counts.shape[0]
            traffic = all_counts.reshape(shards, shards, -1)  # [shards, shards, local]
        send = _exchange_ragged if exchange == "ragged" else _exchange_padded
        outputs = send(x[order // top_k], traffic, lambda r, c: _experts(r, c, *weights, gmm_impl))

    # Unsorting by gathering with the inverse permutation turns the sum over a token's experts
    # into a reshape and a reduction: deterministic, unlike a scatter-add.
    per_choice = outputs[jnp.argsort(order)].reshape(num_tokens, top_k, -1)  # [t, k, d]
    accumulate = jnp.promote_types(x.dtype, jnp.float32)
    y = jnp.einsum(
        "tkd,tk->td", per_choice, combine_weights.astype(x.dtype), preferred_element_type=accumulate
    )
    # Each tensor shard holds part of d_ff, so its w_down product is a partial sum (with one
    # shard the sum is free, and it still tells shard_map the result is the same on each).
    y = jax.lax.psum(y, TENSOR_AXIS)
    return y.astype(x.dtype)  # [t, d]


def _llep_order(sorted_expert: jax.Array, counts: jax.Array, plan: llep.LLEPPlan) -> jax.Array:
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


def _experts(
    rows: jax.Array,
    group_sizes: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    gmm_impl: str,
) -> jax.Array:
    """SwiGLU of each local expert on its rows: `rows [m, d]` grouped by expert with
    `group_sizes [local experts]` -> [m, d]; rows past the groups come out zero."""
    gate = gmm(rows, w_gate, group_sizes, impl=gmm_impl)  # [m, d_ff / tensor]
    up = gmm(rows, w_up, group_sizes, impl=gmm_impl)
    return gmm(jax.nn.silu(gate) * up, w_down, group_sizes, impl=gmm_impl)  # [m, d]


def _count_matrix(counts: jax.Array) -> jax.Array:
    """Every shard's per-expert assignment counts: [shards (source), experts] int32."""
    return jax.lax.all_gather(counts, EXPERT_AXIS)


def _run_local_experts(received: jax.Array, local_expert: jax.Array, arrivals, run_experts):
    """Regroups `received [m, d]` rows by `local_expert [m]`, their group (padding rows carry
    the number of groups, so they sort last), runs the experts, and puts the results back in
    the received order."""
    regroup = jnp.argsort(local_expert, stable=True)  # [m]
    group_sizes = jnp.sum(arrivals, axis=0).astype(jnp.int32)  # [local experts]
    outputs = run_experts(received[regroup], group_sizes)  # [m, d]
    return outputs[jnp.argsort(regroup)]


def _exchange_padded(rows: jax.Array, traffic: jax.Array, run_experts) -> jax.Array:
    """Rows to their shards and back with `all_to_all` over one [rows, d] buffer per shard.

    Args:
      rows: [m, d], this device's assignments grouped by destination shard, then by group
        there (m = tokens * top_k).
      traffic: [shards (source), shards (destination), groups] int32, the rows every source
        sends to every group of every shard (the same on each shard).
      run_experts: (rows grouped by group, group sizes) -> outputs, same shape.

    Returns:
      [m, d]: the expert output of each row of `rows`.
    """
    m, _ = rows.shape
    shards = jax.lax.axis_size(EXPERT_AXIS)
    me = jax.lax.axis_index(EXPERT_AXIS)
    send_counts = jnp.sum(traffic[me], axis=1)  # [shards]
    send_start = jnp.cumsum(send_counts) - send_counts  # [shards]
    slot = jnp.arange(m)  # position inside a destination's buffer

    # buffer[s, p] = the p-th row for shard s, or zeros past its count.
    source_row = send_start[:, None] + slot[None, :]  # [shards, m]
    valid = slot[None, :] < send_counts[:, None]  # [shards, m]
    buffers = jnp.where(valid[..., None], rows[jnp.minimum(source_row, m - 1)], 0)
    received = jax.lax.all_to_all(buffers, EXPERT_AXIS, 0, 0, tiled=True)  # [shards, m, d]

    # Within each source's buffer, rows come grouped by group: the count of inclusive group
    # ends at or below a position is its group (the number of groups for padding).
    arrivals = traffic[:, me, :]  # [shards, groups]
    group_ends = jnp.cumsum(arrivals, axis=1)  # [shards, local experts]
    local_expert = jax.vmap(lambda ends: jnp.searchsorted(ends, slot, side="right"))(group_ends)
    outputs = _run_local_experts(
        received.reshape(shards * m, -1), local_expert.reshape(-1), arrivals, run_experts
    )
    returned = jax.lax.all_to_all(
        outputs.reshape(shards, m, -1), EXPERT_AXIS, 0, 0, tiled=True
    )  # [shards, m, d]: returned[s, p] is the output of the p-th row sent to shard s

    destination = jnp.repeat(
        jnp.arange(shards), send_counts, total_repeat_length=m
    )  # [m], shard of each sorted row
    return returned[destination, slot - send_start[destination]]


def _exchange_ragged(rows: jax.Array, traffic: jax.Array, run_experts) -> jax.Array:
    """Rows to their shards and back with `ragged_all_to_all`: each shard gets only its rows.

    Same contract as `_exchange_padded`. The receive buffer holds, one source after another,
    what every source sent; it is sized for the worst case (every source's m rows).
    """
    m, _ = rows.shape
    shards = jax.lax.axis_size(EXPERT_AXIS)
    me = jax.lax.axis_index(EXPERT_AXIS)
    sent = jnp.sum(traffic, axis=2)  # [shards, shards]: rows shard s sends to shard r
    before_source = jnp.cumsum(sent, axis=0) - sent  # rows of earlier sources, per receiver
    before_receiver = jnp.cumsum(sent, axis=1) - sent  # a source's rows for earlier receivers
    send_counts, recv_counts = sent[me], sent[:, me]  # [shards] each
    send_start = before_receiver[me]  # where each destination's rows start in `rows`
    recv_start = before_source[:, me]  # where each source's rows land here
    received = jax.lax.ragged_all_to_all(
        rows,
        # Zeros varying like `rows`: a mesh-invariant buffer would be broadcast onto the
        # devices, and its cotangent summed over all of them, in every backward pass.
        jnp.zeros_like(rows, shape=(shards * m, rows.shape[1])),
        send_start,
        send_counts,
        before_source[me],  # where this shard's rows land in each receiver's buffer
        recv_counts,
        axis_name=EXPERT_AXIS,
    )  # [shards * m, d]

    arrivals = traffic[:, me, :]  # [shards, groups]
    # The receive buffer is [source, group]-major: a position's group is its flat group
    # (inclusive ends) modulo the groups; past every group, padding.
    group_ends = jnp.cumsum(arrivals.reshape(-1))  # [shards * groups]
    flat_group = jnp.searchsorted(group_ends, jnp.arange(shards * m), side="right")
    groups = arrivals.shape[1]
    local_expert = jnp.where(flat_group < group_ends.shape[0], flat_group % groups, groups)
    outputs = _run_local_experts(received, local_expert, arrivals, run_experts)
    return jax.lax.ragged_all_to_all(
        outputs,
        jnp.zeros_like(rows),
        recv_start,
        recv_counts,
        before_receiver[:, me],  # where this shard's rows started in each source's `rows`
        send_counts,
        axis_name=EXPERT_AXIS,
    )  # [m, d]
