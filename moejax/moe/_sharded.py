"""Dropless mixture-of-experts over a device mesh: `jax.shard_map` with an explicit all-to-all.

What the "dropless", "expert_parallel" and "llep" strategies share. The compiler cannot partition
a `pallas_call`, so the grouped matmuls of a sharded step run inside `jax.shard_map`, on each
device's own tokens. With the `expert` mesh axis of size 1 ("dropless") every device holds every
expert and runs them on its local tokens. With
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

Which shard computes which rows is a `Balance`: plain expert parallelism (`PLAIN`) sends every
row to its expert's owner; Least-Loaded Expert Parallelism (`moejax.moe.llep`) moves the excess
rows of overloaded shards, with their experts' weights, to shards with spare capacity. Both
exchanges take the balance's traffic matrix (rows from every source to every group of every
shard), so they serve plain and balanced dispatch alike; results come back to the rows' source
shards either way.

The other mesh axes: tokens are split over (data, fsdp, expert) as everywhere (the "batch" rule),
each (data, fsdp) group of devices exchanging among its own expert shards; the fsdp-sharded
d_model axis of the weights is gathered at the shard_map boundary (FSDP gathers weights for use,
never across experts); the tensor-sharded d_ff axis stays sharded and the partial outputs of
w_down are summed over "tensor" once per token.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from kernels_pallas.grouped_matmul.ops import GMM_IMPLS
from kernels_pallas.platform import target_platform
from moejax.errors import require_one_of
from moejax.moe.experts import EXPERT_WEIGHTS, expert_swiglu, grouped_matmul
from moejax.parallel import sharding
from moejax.routers.base import Routing

EXCHANGES = ("auto", "ragged", "padded")
EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"


class Balance(NamedTuple):
    """Which expert shard computes which rows, from the gathered count matrix.

    Attributes:
      route: `(all_counts [shards, experts], sorted_expert [m], counts [experts], weights) ->
        (permutation [m] or None, weights, traffic [shards, shards, groups])`, run inside the
        shard_map on every expert shard: the permutation regroups this shard's rows (sorted by
        expert) as the traffic sends them (None: already so), `weights` the local expert weights
        with any borrowed ones appended, and traffic the rows every source sends to every group
        of every shard.
      loads: `all_counts -> [shards]` int32, the rows each shard's groups compute.
    """

    route: Callable
    loads: Callable[[jax.Array], jax.Array]


def plain_loads(all_counts: jax.Array) -> jax.Array:
    """[shards] int32: rows each shard's experts compute under plain expert parallelism."""
    shards, num_experts = all_counts.shape
    return jnp.sum(all_counts.reshape(shards, shards, num_experts // shards), axis=(0, 2))


def _plain_route(all_counts, sorted_expert, counts, weights):
    del sorted_expert, counts
    shards = all_counts.shape[0]
    return None, weights, all_counts.reshape(shards, shards, -1)  # [shards, shards, local]


# Plain expert parallelism: every row goes to its expert's owner.
PLAIN = Balance(route=_plain_route, loads=plain_loads)


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
    balance: Balance = PLAIN,
) -> jax.Array:
    """Dropless dispatch of batch-sharded tokens inside `jax.shard_map` over `mesh`.

    Args:
      x: [tokens, d_model], tokens sharded over the "batch" mesh axes.
      expert_index, combine_weights: [tokens, top_k], sharded like x.
      expert_params: {"w_gate", "w_up": [experts, d_model, d_ff], "w_down": [experts, d_ff,
        d_model]} in x's dtype; experts sharded over "expert", d_ff over "tensor".
      mesh: the mesh the step is traced under.
      gmm_impl: `impl` of `kernels_pallas.gmm`.
      exchange: one of `EXCHANGES` (see the module docstring); unused with one expert shard.
      balance: which shard computes which rows (`PLAIN`, or LLEP's); the result is the same.

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
    tokens = sharding.logical_to_mesh(("batch", None))
    weight_in = PartitionSpec(EXPERT_AXIS, None, TENSOR_AXIS)
    weight_out = PartitionSpec(EXPERT_AXIS, TENSOR_AXIS, None)
    local = functools.partial(
        _local_dispatch,
        num_experts=num_experts,
        gmm_impl=gmm_impl,
        exchange=resolve_exchange(exchange),
        balance=balance,
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
    balance: Balance = PLAIN,
) -> jax.Array:
    """The rows each expert shard's grouped matmuls compute in `sharded_dropless` with the same
    arguments, from the same count matrix and balance.

    Args:
      expert_index: [tokens, top_k], sharded like `sharded_dropless`'s.

    Returns:
      [data * fsdp, expert shards] int32: per group of devices that exchange rows among
      themselves, the load of each of its expert shards.
    """

    def local(index: jax.Array) -> jax.Array:
        counts = jnp.bincount(index.reshape(-1), length=num_experts).astype(jnp.int32)
        return balance.loads(count_matrix(counts))[None]  # [1, shards]

    batch = sharding.logical_to_mesh(("batch", None))
    loads = jax.shard_map(local, mesh=mesh, in_specs=batch, out_specs=batch)(expert_index)
    # Every expert shard of a group computed the same row; keep one per group.
    return loads[:: mesh.shape[EXPERT_AXIS]]


def dispatch(
    x: jax.Array,
    routing: Routing,
    expert_params: dict[str, jax.Array],
    mesh: jax.sharding.AbstractMesh,
    *,
    gmm_impl: str,
    exchange: str = "auto",
    balance: Balance = PLAIN,
) -> tuple[jax.Array, jax.Array]:
    """`sharded_dropless` as a dispatch function: (y, dropped_fraction 0)."""
    params = {name: expert_params[name].astype(x.dtype) for name in EXPERT_WEIGHTS}
    y = sharded_dropless(
        x,
        routing.expert_index,
        routing.combine_weights,
        params,
        mesh,
        gmm_impl=gmm_impl,
        exchange=exchange,
        balance=balance,
    )
    return y, jnp.zeros((), jnp.float32)


def check_options(options: object, field: str) -> None:
    """ConfigError naming `field`.<option> unless `options.gmm_impl` (and `options.exchange`,
    where it has one) are known."""
    require_one_of(f"{field}.gmm_impl", options.gmm_impl, GMM_IMPLS)
    if hasattr(options, "exchange"):
        require_one_of(f"{field}.exchange", options.exchange, EXCHANGES)


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
    balance: Balance,
) -> jax.Array:
    """One device's part: its tokens `x [t, d]` and its experts `w_* [experts / n, ...]`."""
    num_tokens, top_k = expert_index.shape
    flat_expert = expert_index.reshape(-1)  # [t*k], token-major
    # Stable: each expert's rows keep token order, so results do not depend on sort ties.
    order = jnp.argsort(flat_expert, stable=True)  # [t*k]
    counts = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)  # [experts]
    weights = (w_gate, w_up, w_down)

    if jax.lax.axis_size(EXPERT_AXIS) == 1:
        outputs = _experts(x[order // top_k], counts, weights, gmm_impl)  # [t*k, d]
    else:
        all_counts = count_matrix(counts)  # [shards, experts]
        regroup, weights, traffic = balance.route(all_counts, flat_expert[order], counts, weights)
        if regroup is not None:
            order = order[regroup]  # rows grouped by destination shard, then group there
        send = _EXCHANGE_FUNCTIONS[exchange]
        outputs = send(x[order // top_k], traffic, lambda r, c: _experts(r, c, weights, gmm_impl))

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


def _experts(
    rows: jax.Array, group_sizes: jax.Array, weights: tuple[jax.Array, ...], gmm_impl: str
) -> jax.Array:
    """SwiGLU of each local expert on its rows: `rows [m, d]` grouped by expert with
    `group_sizes [groups]` -> [m, d]; rows past the groups come out zero."""
    params = dict(zip(EXPERT_WEIGHTS, weights, strict=True))
    return expert_swiglu(rows, params, grouped_matmul(group_sizes, gmm_impl))


def count_matrix(counts: jax.Array) -> jax.Array:
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


# The collective of each resolved exchange (see `resolve_exchange`).
_EXCHANGE_FUNCTIONS = {"ragged": _exchange_ragged, "padded": _exchange_padded}
