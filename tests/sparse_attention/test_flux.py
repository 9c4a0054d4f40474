"""The Flux layer router's training filter: only the router's parameters learn."""

import jax.numpy as jnp
import optax
from flax import nnx

from moejax.sparse_attention import AttentionConfig, SparseAttention
from moejax.sparse_attention.flux import freeze_all_but_router, router_param_filter


def test_flux_freeze_trains_only_the_router():
    attention = AttentionConfig.of("local", options={"window": 16}, block_size=16, flux_router=True)
    layer = SparseAttention(
        16, 2, 2, 8, 1e4, attention=attention, dtype=jnp.float32, param_dtype=jnp.float32,
        rngs=nnx.Rngs(0),
    )  # fmt: skip
    router_params = nnx.state(layer, router_param_filter)
    assert set(nnx.to_pure_dict(router_params)) == {"flux_router"}
    params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
    tx = freeze_all_but_router(optax.sgd(1.0), params)
    grads = {
        name: {k: jnp.ones_like(v) for k, v in value.items()}
        if isinstance(value, dict)
        else jnp.ones_like(value)
        for name, value in params.items()
    }
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.abs(updates["w_q"]).sum()) == 0.0
    assert all(float(jnp.abs(u).sum()) > 0 for u in updates["flux_router"].values())
