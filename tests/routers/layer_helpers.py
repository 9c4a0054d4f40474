"""A small MoE layer, for router tests that go through the layer."""

from pathlib import Path
from typing import Any

import jax
from flax import nnx

from moejax.config import MoEConfig, RouterConfig
from moejax.models.moe_layer import MoELayer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
D_MODEL, EXPERTS, TOP_K = 8, 4, 2


def make_layer(
    router: str, seed: int = 0, *, options: dict[str, Any] | None = None, **router_fields: Any
) -> MoELayer:
    """A float32 dropless MoE layer of 4 experts, top-2, routed by `router` with its own
    `options` (fields of its `RouterOptions`) and `router_fields` (the `RouterConfig` loss
    weights)."""
    router_config = RouterConfig.of(router, **(options or {}))
    if router_fields:
        router_config = RouterConfig(router, router_config.options, **router_fields)
    moe = MoEConfig(num_experts=EXPERTS, top_k=TOP_K, expert_d_ff=16)
    return MoELayer.from_config(D_MODEL, moe, router_config, rngs=nnx.Rngs(seed))


def hidden(batch: int = 2, length: int = 6, seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, length, D_MODEL))
