"""The recurrent router (RMoE): a GRU state carried from layer to layer decides the routing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.routers.recurrent import (
    GRU_PARAM_NAMES,
    gru_cell,
    init_gru_params,
    init_recurrent_router_params,
    recurrent_router,
)
from tests.routers.routing_helpers import D_MODEL, EXPERTS, hidden_states


def test_bad_init_options_name_the_field():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="d_state: got -1"):
        init_recurrent_router_params(key, D_MODEL, EXPERTS, d_state=-1)


def _gru_reference(params: dict, h: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Float64 GRU step written gate by gate."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items() if k in GRU_PARAM_NAMES}
    s = h.shape[1]

    def gate(i: int, source: str, value: np.ndarray) -> np.ndarray:
        w, b = p[f"gru_w_{source}"], p[f"gru_b_{source}"]
        return value @ w[:, i * s : (i + 1) * s] + b[i * s : (i + 1) * s]

    def sigmoid(v: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-v))

    r = sigmoid(gate(0, "x", x) + gate(0, "h", h))
    z = sigmoid(gate(1, "x", x) + gate(1, "h", h))
    n = np.tanh(gate(2, "x", x) + r * gate(2, "h", h))
    return (1.0 - z) * n + z * h


def _big_gru_params(d_state: int, seed: int) -> dict:
    """GRU params at O(1) scale with nonzero biases, so every term of the cell matters."""
    params = init_gru_params(jax.random.key(seed), d_state)
    rng = np.random.default_rng(seed)
    return {
        k: jnp.asarray(rng.standard_normal(v.shape) * 0.5, jnp.float32) for k, v in params.items()
    }


def test_gru_cell_matches_float64_reference():
    params = _big_gru_params(d_state=8, seed=10)
    rng = np.random.default_rng(11)
    h, x = rng.standard_normal((20, 8)), rng.standard_normal((20, 8))
    out = gru_cell(params, jnp.asarray(h, jnp.float32), jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(out, _gru_reference(params, h, x), rtol=1e-5, atol=1e-5)


def test_first_layer_is_a_gru_step_from_zeros():
    params = init_recurrent_router_params(jax.random.key(12), D_MODEL, EXPERTS, d_state=8)
    params.update(_big_gru_params(d_state=8, seed=13))
    hidden = hidden_states(10, seed=14)
    routed, state = recurrent_router(hidden, params, None, top_k=2)
    routed_zeros, state_zeros = recurrent_router(hidden, params, jnp.zeros((10, 8)), top_k=2)
    x_proj = np.asarray(hidden, np.float64) @ np.asarray(params["w_proj"], np.float64)
    expected = _gru_reference(params, np.zeros((10, 8)), x_proj)
    np.testing.assert_allclose(state, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(state, state_zeros)
    np.testing.assert_array_equal(routed.router_probs, routed_zeros.router_probs)
    logits = expected @ np.asarray(params["w_out"], np.float64)
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(
        routed.router_probs, probs / probs.sum(axis=1, keepdims=True), rtol=1e-4, atol=1e-6
    )


def test_recurrent_state_carries_routing_history():
    params = init_recurrent_router_params(jax.random.key(15), D_MODEL, EXPERTS, d_state=8)
    params.update(_big_gru_params(d_state=8, seed=16))
    params["w_out"] = params["w_out"] * 50.0
    hidden = hidden_states(10, seed=17)
    _, state_1 = recurrent_router(hidden, params, None, top_k=2)
    other_state = jnp.asarray(np.random.default_rng(18).standard_normal((10, 8)), jnp.float32)
    routed_a, state_a = recurrent_router(hidden, params, state_1, top_k=2)
    routed_b, state_b = recurrent_router(hidden, params, other_state, top_k=2)
    assert np.abs(np.asarray(routed_a.router_probs - routed_b.router_probs)).max() > 1e-3
    assert np.abs(np.asarray(state_a - state_b)).max() > 1e-3
    # The gradient of a later layer's routing reaches the earlier layer's projection.
    grad = jax.grad(
        lambda p: jnp.sum(
            recurrent_router(
                hidden, params, recurrent_router(hidden, p, None, top_k=2)[1], top_k=2
            )[0].router_probs[:, 0]
        )
    )(params)
    assert np.abs(np.asarray(grad["w_proj"])).max() > 0


def test_recurrent_bad_state_names_the_field():
    params = init_recurrent_router_params(jax.random.key(0), D_MODEL, EXPERTS, d_state=8)
    with pytest.raises(ValueError, match="state_prev: got"):
        recurrent_router(hidden_states(4), params, jnp.zeros((4, 9)), top_k=1)
