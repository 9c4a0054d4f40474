"""The "dropless" dispatch strategy: grouped matmuls over assignments sorted by expert.

Gale et al., "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts" (2022). Every device
holds every expert; under a mesh of several devices the grouped matmuls (a `pallas_call` the
compiler cannot partition) run inside `jax.shard_map` on each device's own tokens
(`moejax.moe._sharded`). To split the experts over the mesh's expert axis, name
"expert_parallel" (or "llep"): this strategy refuses a mesh with expert shards.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax.moe import _rows, _sharded
from moejax.moe.dispatch import DispatchOptions, DispatchSpec, check_inputs, register
from moejax.moe.experts import ExpertParams, einsum, expert_swiglu, grouped_matmul
from moejax.routers.base import Routing


@dataclasses.dataclass(frozen=True)
class DroplessOptions(DispatchOptions):
    """Options of the "dropless" strategy."""

    # The grouped matmul implementation, `impl` of kernels_pallas.gmm.
    gmm_impl: str = "auto"

    def __post_init__(self) -> None:
        _sharded.check_options(self, "model.moe.dispatch.options")


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
      expert_params: see `moejax.moe.experts`.
      gmm_impl: `impl` passed to `kernels_pallas.gmm`.

    Returns:
      y: [tokens, d_model] in x's dtype, and dropped_fraction: scalar float32, always 0.
    """
    num_experts = check_inputs(x, routing, expert_params)
    flat_expert = routing.expert_index.reshape(-1)  # [tokens*k], token-major
    group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)  # [experts]
    # Each expert's rows in token order: a row is its expert's first row plus its rank.
    first_row = jnp.cumsum(group_sizes) - group_sizes  # [experts]
    sorted_row = first_row[flat_expert] + _rows.rank_within_expert(flat_expert, num_experts)
    rows = _rows.SlotRows.build(sorted_row.reshape(routing.expert_index.shape), flat_expert.size)

    sorted_rows = _rows.dispatch_rows(x, rows)  # [tokens*k, d_model]
    matmul = grouped_matmul(group_sizes, gmm_impl)
    sorted_out = expert_swiglu(sorted_rows, expert_params, matmul)  # [tokens*k, d_model]
    out = _rows.collect_rows(sorted_out, rows)  # [tokens, k, d_model]
    y = einsum("tkd,tk->td", out, routing.combine_weights.astype(x.dtype))  # [tokens, d_model]
    return y, jnp.zeros((), jnp.float32)


def _dropless(
    x: jax.Array,
    routing: Routing,
    expert_params: ExpertParams,
    *,
    mesh: jax.sharding.AbstractMesh | None,
    gmm_impl: str,
) -> tuple[jax.Array, jax.Array]:
    """The strategy: `dropless_dispatch`, inside a shard_map over the data axes on a mesh."""
    if mesh is None:
        return dropless_dispatch(x, routing, expert_params, gmm_impl=gmm_impl)
    return _sharded.dispatch(x, routing, expert_params, mesh, gmm_impl=gmm_impl)


DROPLESS = register(
    DispatchSpec(
        name="dropless",
        dispatch=_dropless,
        options=DroplessOptions,
        needs=("mesh",),
        expert_shards="one",
    )
)
