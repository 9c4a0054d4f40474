"""Re-exports of the router contract, kept so imports of `moejax.routing` keep working.

The code lives in `moejax.routers`: the `Routing` type, `RouterSpec` and the registry in
`moejax.routers.base`, the auxiliary losses in `moejax.routers.losses`, one file per router.
`get_router(name)` is the route function of `moejax.routers.get(name)`.
"""

from moejax.routers.base import (
    ROUTERS,
    Routing,
    check_router_inputs,
    expert_load,
    get,
    routing_statistics,
)
from moejax.routers.losses import active_load_balance_loss, load_balance_loss, router_z_loss
from moejax.routers.softmax_top_k import softmax_top_k

__all__ = [
    "ROUTERS",
    "Routing",
    "active_load_balance_loss",
    "check_router_inputs",
    "expert_load",
    "get_router",
    "load_balance_loss",
    "router_z_loss",
    "routing_statistics",
    "softmax_top_k",
]


def get_router(name: str):
    """The route function of the router registered under `name`."""
    return get(name).route
