"""`MoELayer.route`, the layer's public routing hook: the routing it returns is the one the
layer's own call dispatches by."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.models.moe_layer import MoELayer, RouterContext


def _loop_reference(layer: MoELayer, x: jax.Array, routing) -> np.ndarray:
    """Each token's output summed over its chosen experts, one SwiGLU expert at a time."""
    tokens = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    w_gate, w_up, w_down = (
        np.asarray(w[...], np.float64) for w in (layer.w_gate, layer.w_up, layer.w_down)
    )
    out = np.zeros_like(tokens)
    index = np.asarray(routing.expert_index)
    weights = np.asarray(routing.combine_weights, np.float64)
    for t, token in enumerate(tokens):
        for k in range(index.shape[1]):
            e = index[t, k]
            gate = token @ w_gate[e]
            hidden = gate / (1.0 + np.exp(-gate)) * (token @ w_up[e])
            out[t] += weights[t, k] * (hidden @ w_down[e])
    return out.reshape(x.shape)


@pytest.mark.parametrize("router", ["softmax_top_k", "hash_layer"])
def test_route_is_the_routing_the_layer_dispatches_by(router):
    layer = MoELayer(8, 16, 4, 2, router=router, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    context = RouterContext(token_ids=jnp.arange(10).reshape(2, 5) * 7 % 13)
    routing = layer.route(x, context, train=False)
    y, aux, _ = layer(x, context, train=False)
    assert routing.expert_index.shape == (10, 2)
    np.testing.assert_array_equal(aux["top1_expert"], routing.expert_index[:, 0])
    np.testing.assert_allclose(y, _loop_reference(layer, x, routing), rtol=2e-4, atol=2e-5)
