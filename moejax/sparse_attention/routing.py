"""The `routing` kind, Routing Transformer attention: online k-means over queries and keys,
attention within clusters, combined with local attention.

Efficient Content-Based Sparse Attention with Routing Transformers (Roy et al., 2021).

Queries and keys are unit-normalised and assigned to the nearest of `num_clusters` centroids
shared by queries and keys (one set per head). The block kernel works on blocks, so routing
assigns blocks, not tokens: a query block's cluster is that of its mean normalised query, a kv
block's that of its mean normalised key. For causal language modelling the paper shares the
query and key projections (`shared_keys`): with separate projections nothing ties a query's
cluster to the clusters of the keys it should read (the assignment has no gradient; MQAR
stayed at chance). Shared keys need the paper's second rule too, no token attends to itself
(`shift_to_previous`): else `|q|^2` wins every softmax and MQAR stays at chance as well. A
query block attends to its local band (the own block and the blocks just before it) and to
the `top_k` earlier kv blocks of its own cluster closest to its centroid. Centroids move by an
exponential moving average of the vectors assigned to them (`update_centroids`), outside the
gradient, as in the paper's online mini-batch k-means.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax.errors import require_config
from moejax.sparse_attention._plans import clamp_top_k, num_local, require_at_least, routed_plan
from moejax.sparse_attention.base import (
    AttentionKindSpec,
    AttentionPlan,
    HeadShape,
    KindOptions,
    KindStateSpec,
    register,
)
from moejax.sparse_attention.selection import (
    BlockSelection,
    expand_kv_heads,
    local_band,
    past_blocks,
    pool_blocks,
    select_top_k,
)


def normalise(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Unit L2 norm over the last axis, in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClusterRouting:
    """Routing Transformer outcome: the `selection`, and the pooled normalised block vectors
    with their cluster ids, which `update_centroids` consumes.

    `q_vectors [batch, q_blocks, heads, d]`, `q_cluster [batch, q_blocks, heads]` int32;
    `k_vectors [batch, kv_blocks, heads, d]`, `k_cluster [batch, kv_blocks, heads]` int32.
    """

    selection: BlockSelection
    q_vectors: jax.Array
    q_cluster: jax.Array
    k_vectors: jax.Array
    k_cluster: jax.Array


def cluster_select(
    q: jax.Array,
    k: jax.Array,
    centroids: jax.Array,
    *,
    block: int,
    top_k: int,
    num_local: int,
) -> ClusterRouting:
    """Block mask from k-means cluster ids.

    Args:
      q: [batch, length, heads, head_dim].
      k: [batch, length, kv_heads, head_dim].
      centroids: [heads, num_clusters, head_dim], unit norm.
      block: query and kv block size.
      top_k: routed same-cluster blocks per query block (clamped to the number of blocks).
      num_local: blocks of the local band, own block included (>= 1).

    Returns:
      A `ClusterRouting` with per-head masks `[batch, heads, blocks, blocks]`.
    """
    heads = q.shape[2]
    centroids = centroids.astype(jnp.float32)
    # Tokens are normalised before pooling so that a few large vectors do not decide the
    # direction of a whole block.
    q_vec = normalise(pool_blocks(normalise(q), block))  # [b, blocks, heads, d]
    k_vec = normalise(expand_kv_heads(pool_blocks(normalise(k), block), heads))
    q_sim = jnp.einsum("bihd,hcd->bihc", q_vec, centroids)  # [b, blocks, heads, clusters]
    k_sim = jnp.einsum("bjhd,hcd->bjhc", k_vec, centroids)
    q_cluster = jnp.argmax(q_sim, axis=-1).astype(jnp.int32)  # [b, blocks, heads]
    k_cluster = jnp.argmax(k_sim, axis=-1).astype(jnp.int32)
    blocks = q_vec.shape[1]
    same = q_cluster.transpose(0, 2, 1)[..., :, None] == k_cluster.transpose(0, 2, 1)[..., None, :]
    # Among same-cluster blocks, prefer keys closest to the query block's centroid.
    q_centroid = jnp.take_along_axis(centroids[None], q_cluster.transpose(0, 2, 1)[..., None], 2)
    scores = jnp.einsum("bhid,bjhd->bhij", q_centroid, k_vec)  # [b, heads, blocks, blocks]
    band = local_band(blocks, blocks, block, block, num_local)
    eligible = same & past_blocks(blocks, blocks, block, block) & ~band
    selection = select_top_k(scores, eligible, top_k, band)
    return ClusterRouting(selection, q_vec, q_cluster, k_vec, k_cluster)


def shared_keys(q: jax.Array, kv_heads: int) -> jax.Array:
    """Keys of shared-QK attention: each kv head is the mean of its group's queries (the
    queries themselves when `kv_heads == heads`).

    `q [batch, length, heads, d]` -> `[batch, length, kv_heads, d]`.
    """
    batch, length, heads, dim = q.shape
    return q.reshape(batch, length, kv_heads, heads // kv_heads, dim).mean(axis=3).astype(q.dtype)


def shift_to_previous(x: jax.Array) -> jax.Array:
    """Slot j holds token j - 1 and slot 0 zeros: `x [batch, length, heads, d]`, same shape.

    With shared queries and keys a token's logit with itself, `|q|^2`, beats every other, so
    the paper (after Reformer) keeps a token from attending to itself. Shifting keys and values
    one slot right turns the causal mask into a strictly causal one without an element mask;
    the zero slot 0 has logit 0 and value 0, a null choice for queries with nothing to read.
    """
    return jnp.pad(x, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]


def update_centroids(
    centroids: jax.Array, vectors: jax.Array, cluster: jax.Array, *, momentum: float
) -> jax.Array:
    """One online k-means step: each centroid moves to `momentum * c + (1 - momentum) * mean`
    of the unit vectors assigned to it, then back onto the unit sphere; centroids that got no
    vector stay put (an empty cluster must not collapse).

    Args:
      centroids: [heads, num_clusters, d].
      vectors: [n, heads, d] unit vectors (queries and keys of the batch, flattened).
      cluster: [n, heads] int cluster ids.
      momentum: in [0, 1).

    Returns:
      [heads, num_clusters, d] float32.
    """
    num_clusters = centroids.shape[1]
    onehot = jax.nn.one_hot(cluster, num_clusters, dtype=jnp.float32)  # [n, heads, clusters]
    sums = jnp.einsum("nhc,nhd->hcd", onehot, vectors.astype(jnp.float32))
    counts = jnp.sum(onehot, axis=0)[..., None]  # [heads, clusters, 1]
    means = sums / jnp.maximum(counts, 1.0)
    moved = normalise(momentum * centroids.astype(jnp.float32) + (1.0 - momentum) * means)
    return jnp.where(counts > 0, moved, centroids.astype(jnp.float32))


def routing_centroid_update(
    centroids: jax.Array, routing: ClusterRouting, *, momentum: float
) -> jax.Array:
    """`update_centroids` on the pooled queries and keys of one forward pass (no gradient)."""
    heads, dim = centroids.shape[0], centroids.shape[-1]
    vectors = jnp.concatenate(
        [routing.q_vectors.reshape(-1, heads, dim), routing.k_vectors.reshape(-1, heads, dim)]
    )
    cluster = jnp.concatenate(
        [routing.q_cluster.reshape(-1, heads), routing.k_cluster.reshape(-1, heads)]
    )
    return jax.lax.stop_gradient(update_centroids(centroids, vectors, cluster, momentum=momentum))


@dataclasses.dataclass(frozen=True)
class RoutingOptions(KindOptions):
    """top_k: same-cluster blocks per query block besides the local band (clamped to the
    blocks before it); window: tokens of the local band, rounded out to whole blocks;
    num_clusters, centroid_momentum: the online k-means; shared_qk: keys are the
    (group-averaged) queries, as the paper does for causal LMs, and the layer has no key
    projection. False keeps a separate key projection (routing then stays near chance on MQAR:
    nothing aligns the two)."""

    top_k: int = 3
    window: int = 256
    num_clusters: int = 4
    centroid_momentum: float = 0.99
    shared_qk: bool = True

    def __post_init__(self) -> None:
        require_at_least(self, ("top_k", "window", "num_clusters"), 1)
        require_config(
            0.0 <= self.centroid_momentum < 1.0,
            "attention.options.centroid_momentum",
            self.centroid_momentum,
            "in [0, 1)",
        )

    @property
    def shares_qk(self) -> bool:
        return self.shared_qk


def init_centroids(key: jax.Array, shape: HeadShape, options: RoutingOptions) -> jax.Array:
    """`[heads, num_clusters, head_dim]` float32 unit vectors in random directions."""
    centroids = jax.random.normal(
        key, (shape.num_heads, options.num_clusters, shape.head_dim), jnp.float32
    )
    return normalise(centroids)


def routing_plan(
    *,
    length: int,
    block_size: int,
    options: RoutingOptions,
    queries: jax.Array,
    keys: jax.Array,
    state: jax.Array,
) -> tuple[AttentionPlan, jax.Array]:
    """`cluster_select` with the centroids `state`, and the centroids after one k-means step."""
    top_k = clamp_top_k(options.top_k, length, block_size)
    band = num_local(options.window, block_size)
    routing = cluster_select(queries, keys, state, block=block_size, top_k=top_k, num_local=band)
    centroids = routing_centroid_update(state, routing, momentum=options.centroid_momentum)
    return routed_plan(routing.selection, block_size, block_size, top_k + band), centroids


ROUTING = register(
    AttentionKindSpec(
        "routing",
        routing_plan,
        needs=("queries", "keys", "state"),
        options=RoutingOptions,
        state=KindStateSpec("centroids", init_centroids, (None, None, None)),
    )
)
