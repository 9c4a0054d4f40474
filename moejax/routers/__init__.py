"""Router families beyond softmax top-k; importing this package registers each by name.

Every router keeps the contract of `moejax.routing`: `fn(router_logits [tokens, experts], *,
top_k, renormalize=True, **options) -> Routing`, with keyword-only options that all have
defaults.
"""

from moejax.routers import dynamic, expert_choice, graph, hashing, noisy, sinkhorn, stateful
from moejax.routers.dynamic import active_experts, capacity_schedule, top_p_router
from moejax.routers.graph import attention_aware_router, similarity_aware_router
from moejax.routers.hashing import hash_router, random_fixed
from moejax.routers.noisy import noisy_top_k
from moejax.routers.sinkhorn import selective_sinkhorn, sinkhorn_log_plan
from moejax.routers.sinkhorn import sinkhorn as sinkhorn_router

__all__ = [
    "active_experts",
    "attention_aware_router",
    "capacity_schedule",
    "dynamic",
    "expert_choice",
    "graph",
    "hash_router",
    "hashing",
    "noisy",
    "noisy_top_k",
    "random_fixed",
    "selective_sinkhorn",
    "similarity_aware_router",
    "sinkhorn",
    "stateful",
    "sinkhorn_log_plan",
    "sinkhorn_router",
    "top_p_router",
]
