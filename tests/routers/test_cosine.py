"""The cosine router: cosine similarity to learned expert centroids with a learned, clamped
temperature (X-MoE)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.routers.cosine import cosine_logits, cosine_router, init_cosine_router_params
from tests.routers.routing_helpers import D_MODEL, EXPERTS, hidden_states


def test_bad_init_options_name_the_field():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="d_space: got 0"):
        init_cosine_router_params(key, D_MODEL, EXPERTS, d_space=0)
    with pytest.raises(ValueError, match="init_temperature: got 5.0"):
        init_cosine_router_params(key, D_MODEL, EXPERTS, init_temperature=5.0)


def test_cosine_logits_invariant_to_positive_scaling_of_hidden():
    params = init_cosine_router_params(jax.random.key(2), D_MODEL, EXPERTS, d_space=8)
    hidden = hidden_states(32)
    reference = cosine_logits(hidden, params)
    for scale in (1e-3, 0.5, 7.0, 1e4):
        np.testing.assert_allclose(cosine_logits(hidden * scale, params), reference, atol=2e-5)


@pytest.mark.parametrize("log_temperature", [np.log(0.07), np.log(0.3), -10.0, 3.0])
def test_cosine_logits_bounded_by_inverse_clamped_temperature(log_temperature):
    params = init_cosine_router_params(jax.random.key(3), D_MODEL, EXPERTS, d_space=8)
    params["log_temperature"] = jnp.asarray(log_temperature, jnp.float32)
    temperature = np.clip(np.exp(log_temperature), 0.01, 1.0)
    # Hidden states along a centroid's preimage reach |cos| = 1, so the bound is attained.
    logits = np.asarray(cosine_logits(hidden_states(64, seed=4), params))
    assert np.abs(logits).max() <= (1.0 / temperature) * (1 + 1e-5)


def test_cosine_top1_is_the_centroid_with_largest_cosine_float64_reference():
    params = init_cosine_router_params(jax.random.key(5), D_MODEL, EXPERTS, d_space=8)
    hidden = hidden_states(48, seed=6)
    result = cosine_router(hidden, params, top_k=2)
    projected = np.asarray(hidden, np.float64) @ np.asarray(params["w_proj"], np.float64)
    centroids = np.asarray(params["centroids"], np.float64)
    cosine = (projected / np.linalg.norm(projected, axis=1, keepdims=True)) @ (
        centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    ).T
    np.testing.assert_array_equal(result.expert_index[:, 0], np.argmax(cosine, axis=1))
    np.testing.assert_allclose(cosine_logits(hidden, params), cosine / 0.07, rtol=1e-5, atol=1e-4)


def test_cosine_temperature_learns_inside_the_clamp_only():
    params = init_cosine_router_params(jax.random.key(7), D_MODEL, EXPERTS, d_space=8)
    hidden = hidden_states(16)

    def loss(p):
        return jnp.sum(cosine_router(hidden, p, top_k=2).combine_weights[:, 0])

    assert float(jax.grad(loss)(params)["log_temperature"]) != 0.0
    params["log_temperature"] = jnp.asarray(-10.0, jnp.float32)  # below log(0.01)
    assert float(jax.grad(loss)(params)["log_temperature"]) == 0.0
