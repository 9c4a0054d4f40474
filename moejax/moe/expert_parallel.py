"""The "expert_parallel" dispatch strategy: dropless, experts split over the mesh's expert axis.

Lepikhin et al., "GShard" (2020); Gale et al., "MegaBlocks" (2022). Each device holds
`num_experts / mesh.expert` consecutive experts; tokens travel to the shard that holds their
expert by an all-to-all and come back the same way (`moejax.moe._sharded`). It needs a mesh with
expert shards (mesh.expert > 1): annotations alone would make the compiler gather every expert's
weights to every device around the grouped matmul it cannot partition.
"""

from __future__ import annotations

import dataclasses

import jax

from moejax.moe import _sharded
from moejax.moe.dispatch import DispatchOptions, DispatchSpec, register
from moejax.moe.experts import ExpertParams
from moejax.routers.base import Routing

# The shard_map machinery this strategy (and "llep") runs on, public here.
EXCHANGES = _sharded.EXCHANGES
PLAIN = _sharded.PLAIN
plain_loads = _sharded.plain_loads
resolve_exchange = _sharded.resolve_exchange
shard_loads = _sharded.shard_loads
sharded_dropless = _sharded.sharded_dropless


@dataclasses.dataclass(frozen=True)
class ExpertParallelOptions(DispatchOptions):
    """Options of the "expert_parallel" strategy."""

    # The grouped matmul implementation, `impl` of kernels_pallas.gmm.
    gmm_impl: str = "auto"
    # How tokens travel between expert shards: "ragged" (ragged_all_to_all, each shard gets only
    # its rows; TPU and GPU), "padded" (all_to_all of worst-case buffers, mesh.expert times the
    # bytes; runs everywhere, and on GPUs where ragged_all_to_all is slow or fails at scale), or
    # "auto" (padded on CPU, else ragged).
    exchange: str = "auto"

    def __post_init__(self) -> None:
        _sharded.check_options(self, "model.moe.dispatch.options")


def _expert_parallel(
    x: jax.Array,
    routing: Routing,
    expert_params: ExpertParams,
    *,
    mesh: jax.sharding.AbstractMesh,
    gmm_impl: str,
    exchange: str,
) -> tuple[jax.Array, jax.Array]:
    return _sharded.dispatch(x, routing, expert_params, mesh, gmm_impl=gmm_impl, exchange=exchange)


EXPERT_PARALLEL = register(
    DispatchSpec(
        name="expert_parallel",
        dispatch=_expert_parallel,
        options=ExpertParallelOptions,
        needs=("mesh",),
        expert_shards="several",
    )
)
