"""Routers: one file per router, each registering its `RouterSpec` when imported.

The registry (`ROUTERS`, `register`, `get`) and the contract live in `moejax.routers.base`, the
auxiliary losses in `moejax.routers.losses`. Adding a router is one file that calls
`register(RouterSpec(...))` and one import line below; the first import stays softmax_top_k, the
default, so error messages list it first.
"""

from moejax.routers import softmax_top_k  # isort: skip  (first: the default router)
from moejax.routers import (
    attention_aware,
    bias_balanced,
    cosine,
    expert_choice,
    hash,
    kmeans,
    noisy,
    random_fixed,
    recurrent,
    relu_rmsnorm,
    selective_sinkhorn,
    similarity_aware,
    sinkhorn,
    top_p,
)
from moejax.routers.attention_aware import attention_aware_router
from moejax.routers.base import ROUTERS, RouterSpec, RouterStateSpec, Routing, get, register
from moejax.routers.dynamic import capacity_schedule
from moejax.routers.hash import hash_router
from moejax.routers.noisy import noisy_top_k
from moejax.routers.similarity_aware import similarity_aware_router
from moejax.routers.sinkhorn import sinkhorn as sinkhorn_router
from moejax.routers.sinkhorn import sinkhorn_log_plan
from moejax.routers.top_p import active_experts, top_p_router

__all__ = [
    "ROUTERS",
    "RouterSpec",
    "RouterStateSpec",
    "Routing",
    "active_experts",
    "attention_aware",
    "attention_aware_router",
    "bias_balanced",
    "capacity_schedule",
    "cosine",
    "expert_choice",
    "get",
    "hash",
    "hash_router",
    "kmeans",
    "noisy",
    "noisy_top_k",
    "random_fixed",
    "recurrent",
    "register",
    "relu_rmsnorm",
    "selective_sinkhorn",
    "similarity_aware",
    "similarity_aware_router",
    "sinkhorn",
    "sinkhorn_log_plan",
    "sinkhorn_router",
    "softmax_top_k",
    "top_p",
    "top_p_router",
]
