"""Mixture-of-experts math: the dispatch strategies, the one expert FFN, capacity helpers.

Every strategy maps `(x [tokens, d_model], routing, expert_params) -> y [tokens, d_model]` and
all agree when no assignment is dropped. A strategy is a `DispatchSpec` in the registry
`DISPATCHES` (`moejax.moe.dispatch`), filled by the imports below, one file per strategy:
"capacity" (fixed expert buffers, overflow dropped), "dropless" (grouped matmuls), and over a
mesh's expert axis "expert_parallel" (all-to-all between expert shards) and "llep" (the same,
with the load of hot experts shared). `moe_ffn` runs one by name.
"""

# The default first: registration order is the order error messages list the names in.
from moejax.moe import dropless  # isort: skip
from moejax.moe import capacity, expert_parallel, llep
from moejax.moe.capacity import CAPACITY_PRIORITIES, CapacityOptions, capacity_dispatch
from moejax.moe.capacity_factors import CAPACITY_SCHEDULES, capacity_schedule, expert_capacity
from moejax.moe.dispatch import (
    DISPATCHES,
    DispatchOptions,
    DispatchSpec,
    MoEOutput,
    get,
    moe_ffn,
    register,
)
from moejax.moe.dropless import DroplessOptions, dropless_dispatch
from moejax.moe.expert_parallel import ExpertParallelOptions
from moejax.moe.experts import ExpertParams, init_expert_params, shared_expert_ffn, swiglu
from moejax.moe.llep import LLEPOptions

__all__ = [
    "CAPACITY_PRIORITIES",
    "CAPACITY_SCHEDULES",
    "DISPATCHES",
    "CapacityOptions",
    "DispatchOptions",
    "DispatchSpec",
    "DroplessOptions",
    "ExpertParallelOptions",
    "ExpertParams",
    "LLEPOptions",
    "MoEOutput",
    "capacity",
    "capacity_dispatch",
    "capacity_schedule",
    "dropless",
    "dropless_dispatch",
    "expert_capacity",
    "expert_parallel",
    "get",
    "init_expert_params",
    "llep",
    "moe_ffn",
    "register",
    "shared_expert_ffn",
    "swiglu",
]
