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
    group_limited_sigmoid,
    hash_layer,
    kmeans,
    noisy_top_k,
    random_fixed,
    recurrent,
    relu_rmsnorm,
    selective_sinkhorn,
    similarity_aware,
    sinkhorn,
    token_table,
    top_p,
)
from moejax.routers.base import ROUTERS, RouterSpec, RouterStateSpec, Routing, get, register

__all__ = [
    "ROUTERS",
    "RouterSpec",
    "RouterStateSpec",
    "Routing",
    "attention_aware",
    "bias_balanced",
    "cosine",
    "expert_choice",
    "get",
    "group_limited_sigmoid",
    "hash_layer",
    "kmeans",
    "noisy_top_k",
    "random_fixed",
    "recurrent",
    "register",
    "relu_rmsnorm",
    "selective_sinkhorn",
    "similarity_aware",
    "sinkhorn",
    "softmax_top_k",
    "token_table",
    "top_p",
]
