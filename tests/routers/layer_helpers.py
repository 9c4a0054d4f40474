"""A small MoE layer built from the tiny config, for router tests that go through the layer."""

from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.config import load_config_file
from moejax.models.moe_layer import MoELayer, MoEOptions

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
D_MODEL, EXPERTS, TOP_K = 8, 4, 2


def make_layer(router: str, seed: int = 0, **options) -> MoELayer:
    """A float32 dropless MoE layer routed by `router`, with `options` replacing MoEOptions."""
    model = load_config_file(CONFIGS / "tiny.py").model
    moe_options = MoEOptions.from_config(model, router=router, dispatch="dropless", **options)
    return MoELayer(
        D_MODEL, 16, EXPERTS, TOP_K, moe_options,
        dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed),
    )  # fmt: skip


def hidden(batch: int = 2, length: int = 6, seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (batch, length, D_MODEL))
