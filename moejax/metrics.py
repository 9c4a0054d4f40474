"""Routing and sparsity metrics of MoE layers: pure functions on arrays, for logging.

A slot of `expert_index [tokens, top_k]` is *active* when its expert index is >= 0 and its
combine weight is nonzero; routers that choose a variable number of experts per token mark the
unused slots that way. Every metric here counts active slots only.

Functions whose output shape is static are jit-able, with the integer arguments (`num_experts`,
`chunk_size`, `seq_len`, `num_buckets`) static.
(`moejax.plotting.load_heatmap` draws expert load.)
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moejax.routers.base import Routing, routing_statistics


def active_slots(expert_index: jax.Array, combine_weights: jax.Array) -> jax.Array:
    """Which routing slots are in use.

    Args:
      expert_index: [..., top_k] int.
      combine_weights: [..., top_k], same shape.

    Returns:
      [..., top_k] bool, True where the index is >= 0 and the combine weight is nonzero.
    """
    _check_same_shape(expert_index=expert_index, combine_weights=combine_weights)
    return (expert_index >= 0) & (combine_weights != 0)


def expert_load(expert_index: jax.Array, combine_weights: jax.Array, num_experts: int) -> jax.Array:
    """Share of the active assignments that go to each expert.

    Equals `routing_statistics(...)["expert_load"]` when every slot is active; that one divides by
    all tokens * top_k slots, so it cannot skip the unused slots of variable-k routers.

    Args:
      expert_index: [tokens, top_k] int.
      combine_weights: [tokens, top_k].
      num_experts: number of experts routed over.

    Returns:
      [num_experts] float32; sums to 1, or is all zeros when no slot is active.
    """
    active = active_slots(expert_index, combine_weights)  # [tokens, top_k]
    # Inactive slots are pointed at expert 0 with weight 0: bincount needs in-range indices.
    counts = jnp.bincount(
        jnp.where(active, expert_index, 0).reshape(-1),
        weights=active.reshape(-1).astype(jnp.float32),
        length=num_experts,
    )  # [experts]
    return counts / jnp.maximum(jnp.sum(counts), 1.0)


def active_experts_per_token(expert_index: jax.Array, combine_weights: jax.Array) -> jax.Array:
    """Mean number of active slots per token (the experts each token runs through).

    Args:
      expert_index: [tokens, top_k] int; a token's active slots name distinct experts.
      combine_weights: [tokens, top_k].

    Returns:
      scalar float32.
    """
    active = active_slots(expert_index, combine_weights)  # [tokens, top_k]
    return jnp.mean(jnp.sum(active, axis=-1, dtype=jnp.float32))


def token_sparsity(
    expert_index: jax.Array, combine_weights: jax.Array, num_experts: int
) -> jax.Array:
    """Token-level sparsity: `1 - mean active experts per token / num_experts`.

    Song et al., "BlockFFN: Towards End-Side Acceleration-Friendly Mixture-of-Experts with
    Chunk-Level Activation Sparsity" (2025).

    Args:
      expert_index: [tokens, top_k] int.
      combine_weights: [tokens, top_k].
      num_experts: number of experts routed over.

    Returns:
      scalar float32 in [0, 1]; 1 - top_k / num_experts for a fixed-k router.
    """
    return 1.0 - active_experts_per_token(expert_index, combine_weights) / num_experts


def chunk_union_sizes(
    expert_index: jax.Array,
    combine_weights: jax.Array,
    num_experts: int,
    *,
    chunk_size: int = 8,
    seq_len: int | None = None,
) -> jax.Array:
    """Number of distinct experts used by each chunk of `chunk_size` consecutive tokens.

    Chunks never cross a sequence boundary. Only whole chunks count: a trailing partial chunk
    holds fewer tokens, would use fewer experts, and would make the statistic depend on the
    sequence length.

    Args:
      expert_index: [batch, length, top_k] int, or [tokens, top_k] with `seq_len` given (tokens
        are sequences laid end to end, as a flattened [batch, length] gives them).
      combine_weights: same shape as expert_index.
      num_experts: number of experts routed over.
      chunk_size: tokens per chunk (L in the paper), 1 <= chunk_size <= length.
      seq_len: length of each sequence when the inputs are [tokens, top_k].

    Returns:
      [batch, length // chunk_size] int32.
    """
    expert_index = _as_sequences(expert_index, seq_len, "expert_index")  # [b, l, k]
    combine_weights = _as_sequences(combine_weights, seq_len, "combine_weights")
    batch, length, top_k = expert_index.shape
    if not 1 <= chunk_size <= length:
        raise ValueError(f"chunk_size: got {chunk_size}; allowed: 1 <= chunk_size <= {length}")
    num_chunks = length // chunk_size
    whole = num_chunks * chunk_size
    active = active_slots(expert_index[:, :whole], combine_weights[:, :whole])
    # one_hot of -1 is all zeros, so inactive slots mark no expert.
    used = jax.nn.one_hot(
        jnp.where(active, expert_index[:, :whole], -1), num_experts, dtype=jnp.bool_
    )  # [b, whole, k, experts]
    used = used.reshape(batch, num_chunks, chunk_size * top_k, num_experts)
    return jnp.sum(jnp.any(used, axis=2), axis=-1, dtype=jnp.int32)  # [b, chunks]


def chunk_sparsity(
    expert_index: jax.Array,
    combine_weights: jax.Array,
    num_experts: int,
    *,
    chunk_size: int = 8,
    seq_len: int | None = None,
) -> jax.Array:
    """Chunk-level sparsity: `1 - mean over chunks of |experts used by the chunk| / num_experts`.

    Song et al., "BlockFFN: Towards End-Side Acceleration-Friendly Mixture-of-Experts with
    Chunk-Level Activation Sparsity" (2025): experts that no token of a chunk needs can be skipped
    for the whole chunk, which is what speculative decoding and batched kernels can exploit.
    Arguments as in `chunk_union_sizes`.

    Returns:
      scalar float32 in [0, 1]; at most `token_sparsity`, equal to it for `chunk_size=1`.
    """
    sizes = chunk_union_sizes(
        expert_index, combine_weights, num_experts, chunk_size=chunk_size, seq_len=seq_len
    )  # [batch, chunks]
    return 1.0 - jnp.mean(sizes.astype(jnp.float32)) / num_experts


def routing_fluctuation(expert_index: jax.Array, other_expert_index: jax.Array) -> jax.Array:
    """Share of tokens whose top-1 expert differs between two routings of the same tokens.

    Dai et al., "StableMoE: Stable Routing Strategy for Mixture of Experts" (2022): routing
    fluctuation between checkpoints, measured on a fixed batch. The top-1 expert is slot 0
    (routers list experts best first).

    Args:
      expert_index: [tokens, top_k] int, e.g. from an earlier checkpoint.
      other_expert_index: [tokens, top_k'] int for the same tokens, e.g. from a later one.

    Returns:
      scalar float32 in [0, 1].
    """
    if (
        expert_index.ndim != 2
        or other_expert_index.ndim != 2
        or other_expert_index.shape[0] != expert_index.shape[0]
    ):
        raise ValueError(
            "expert_index, other_expert_index: expected [tokens, top_k] for the same tokens, got "
            f"shapes {expert_index.shape} and {other_expert_index.shape}"
        )
    return jnp.mean((expert_index[:, 0] != other_expert_index[:, 0]).astype(jnp.float32))


def routing_fluctuation_from_probs(
    router_probs: jax.Array, other_router_probs: jax.Array
) -> jax.Array:
    """`routing_fluctuation` from router probabilities: top-1 is the argmax expert.

    Args:
      router_probs: [tokens, num_experts].
      other_router_probs: [tokens, num_experts], same tokens and experts.

    Returns:
      scalar float32 in [0, 1].
    """
    if router_probs.ndim != 2:
        raise ValueError(f"router_probs: expected [tokens, num_experts], got {router_probs.shape}")
    _check_same_shape(router_probs=router_probs, other_router_probs=other_router_probs)
    top1 = jnp.argmax(router_probs, axis=-1)  # [tokens]
    other_top1 = jnp.argmax(other_router_probs, axis=-1)  # [tokens]
    return jnp.mean((top1 != other_top1).astype(jnp.float32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertAffinity:
    """How a token's expert at one layer predicts its expert at the next.

    Attributes:
      conditional: [num_experts, num_experts] float32, row e is P(e' at layer l+1 | e at layer
        l); each row sums to 1, or is all zeros when no token chose e at layer l.
      predictability: scalar float32, share of tokens whose next-layer expert is the most
        frequent successor of their expert (the token-weighted mean of each row's maximum);
        about 1 / num_experts for independent layers, 1 when one layer determines the next.
    """

    conditional: jax.Array
    predictability: jax.Array


def expert_affinity(
    top1_index: jax.Array, next_top1_index: jax.Array, num_experts: int
) -> ExpertAffinity:
    """Inter-layer expert affinity from the top-1 experts of two consecutive MoE layers.

    Yao et al., "Exploiting Inter-Layer Expert Affinity for Accelerating Mixture-of-Experts Model
    Inference" (2024): strong affinity lets expert placement keep a token on one device across
    layers. Tokens inactive (index -1) at either layer are left out.

    Args:
      top1_index: [tokens] int, expert at layer l (`expert_index[:, 0]`).
      next_top1_index: [tokens] int, expert at layer l + 1 for the same tokens.
      num_experts: number of experts of each layer.

    Returns:
      An `ExpertAffinity`.
    """
    if top1_index.ndim != 1:
        raise ValueError(f"top1_index: expected [tokens], got shape {top1_index.shape}")
    _check_same_shape(top1_index=top1_index, next_top1_index=next_top1_index)
    both = (top1_index >= 0) & (next_top1_index >= 0)  # [tokens]
    pair = jnp.where(both, top1_index * num_experts + next_top1_index, 0)  # [tokens]
    counts = jnp.bincount(
        pair, weights=both.astype(jnp.float32), length=num_experts * num_experts
    ).reshape(num_experts, num_experts)  # [experts, experts]
    row_totals = jnp.sum(counts, axis=-1, keepdims=True)  # [experts, 1]
    conditional = counts / jnp.maximum(row_totals, 1.0)
    predictability = jnp.sum(jnp.max(counts, axis=-1)) / jnp.maximum(jnp.sum(counts), 1.0)
    return ExpertAffinity(conditional=conditional, predictability=predictability)


def router_cosine_similarity(router_weights: jax.Array) -> jax.Array:
    """Cosine similarity between the routing directions of every pair of experts.

    Router columns pointing the same way send the same tokens to both experts; rising similarity
    is a sign of the collapse studied by Chi et al., "On the Representation Collapse of Sparse
    Mixture of Experts" (2022).

    Args:
      router_weights: [d_model, num_experts], column e scores expert e.

    Returns:
      [num_experts, num_experts] float32, symmetric, with ones on the diagonal (zeros on row and
      column of an all-zero router column, which has no direction).
    """
    if router_weights.ndim != 2:
        raise ValueError(
            f"router_weights: expected [d_model, num_experts], got shape {router_weights.shape}"
        )
    weights = router_weights.astype(jnp.float32)
    norms = jnp.linalg.norm(weights, axis=0)  # [experts]
    directions = weights / jnp.where(norms > 0, norms, 1.0)  # [d_model, experts]
    return directions.T @ directions


def mean_off_diagonal(matrix: jax.Array) -> jax.Array:
    """Mean of the off-diagonal entries of a square matrix.

    Args:
      matrix: [n, n].

    Returns:
      scalar float32; 0 for n = 1, which has no off-diagonal entry.
    """
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix: expected a square [n, n] matrix, got shape {matrix.shape}")
    n = matrix.shape[0]
    off_diagonal = jnp.sum(matrix, dtype=jnp.float32) - jnp.trace(matrix).astype(jnp.float32)
    return off_diagonal / max(n * (n - 1), 1)


def drop_rate_by_position(
    dropped: jax.Array,
    *,
    active: jax.Array | None = None,
    seq_len: int | None = None,
    num_buckets: int | None = None,
) -> jax.Array:
    """Fraction of active assignments dropped (expert over capacity) at each sequence position.

    Capacity routing fills expert slots in token order, so later positions are dropped more
    often; this shows how much the tail of a sequence loses.

    Args:
      dropped: [batch, length, top_k] bool, or [tokens, top_k] with `seq_len` given.
      active: same shape as dropped, bool; the assignments that exist (default: all).
      seq_len: length of each sequence when the inputs are [tokens, top_k].
      num_buckets: group positions into this many contiguous, near-equal buckets
        (1 <= num_buckets <= length); the rate of a bucket pools its assignments.

    Returns:
      [length] float32, or [num_buckets]; 0 where a position has no active assignment.
    """
    dropped = _as_sequences(dropped, seq_len, "dropped")  # [b, l, k]
    if active is None:
        active = jnp.ones(dropped.shape, jnp.bool_)
    active = _as_sequences(active, seq_len, "active")
    _check_same_shape(dropped=dropped, active=active)
    length = dropped.shape[1]
    drops = jnp.sum(dropped & active, axis=(0, 2), dtype=jnp.float32)  # [length]
    totals = jnp.sum(active, axis=(0, 2), dtype=jnp.float32)  # [length]
    if num_buckets is not None:
        if not 1 <= num_buckets <= length:
            raise ValueError(
                f"num_buckets: got {num_buckets}; allowed: 1 <= num_buckets <= length={length}"
            )
        # Position p goes to bucket floor(p * B / length): contiguous, sizes differ by at most 1.
        bucket = np.arange(length) * num_buckets // length
        drops = jax.ops.segment_sum(drops, bucket, num_segments=num_buckets)
        totals = jax.ops.segment_sum(totals, bucket, num_segments=num_buckets)
    return drops / jnp.maximum(totals, 1.0)


def layer_metrics(
    routing: Routing,
    num_experts: int,
    *,
    seq_len: int,
    chunk_size: int = 8,
    dropped: jax.Array | None = None,
    num_buckets: int | None = None,
) -> dict[str, jax.Array]:
    """Routing and sparsity metrics of one MoE layer, named for `moe/layer{i}/{name}`.

    Args:
      routing: the layer's `Routing` for [tokens] = [batch * seq_len] tokens, sequences laid end
        to end.
      num_experts: number of experts routed over.
      seq_len: tokens per sequence; chunks never cross sequences.
      chunk_size: tokens per chunk for "chunk_sparsity".
      dropped: [tokens, top_k] bool, assignments dropped for lack of capacity, if known.
      num_buckets: position buckets for "drop_rate_by_position" (default: one per position).

    Returns:
      "expert_load": [num_experts]; "load_max_over_mean", "routing_entropy",
      "active_experts_per_token", "token_sparsity", "chunk_sparsity": scalars float32; with
      `dropped`, also "drop_rate_by_position": [seq_len] or [num_buckets].
    """
    index, weights = routing.expert_index, routing.combine_weights
    load = expert_load(index, weights, num_experts)  # [experts]
    metrics = {
        # routing_statistics's load counts inactive slots too; the active-only load replaces it.
        **routing_statistics(routing, num_experts),
        "expert_load": load,
        # max / mean of a load summing to 1 is max * num_experts; stays 0 when nothing is active.
        "load_max_over_mean": jnp.max(load) * num_experts,
        "active_experts_per_token": active_experts_per_token(index, weights),
        "token_sparsity": token_sparsity(index, weights, num_experts),
        "chunk_sparsity": chunk_sparsity(
            index, weights, num_experts, chunk_size=chunk_size, seq_len=seq_len
        ),
    }
    if dropped is not None:
        metrics["drop_rate_by_position"] = drop_rate_by_position(
            dropped,
            active=active_slots(index, weights),
            seq_len=seq_len,
            num_buckets=num_buckets,
        )
    return metrics


def _as_sequences(x: jax.Array, seq_len: int | None, name: str) -> jax.Array:
    """[batch, length, top_k] as given, or [tokens, top_k] cut into sequences of `seq_len`."""
    if x.ndim == 3 and seq_len in (None, x.shape[1]):
        return x
    if x.ndim == 2 and seq_len is not None and seq_len >= 1 and x.shape[0] % seq_len == 0:
        return x.reshape(x.shape[0] // seq_len, seq_len, x.shape[1])
    raise ValueError(
        f"{name}: expected [batch, length, top_k], or [tokens, top_k] with tokens a multiple of "
        f"seq_len; got shape {x.shape} with seq_len={seq_len}"
    )


def _check_same_shape(**arrays: jax.Array) -> None:
    """Raises a ValueError naming the arrays when their shapes differ."""
    shapes = {name: tuple(array.shape) for name, array in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{', '.join(shapes)}: shapes must match, got {shapes}")
