"""Routers with parameters (`moejax.routers.learned`): each one's defining property."""

import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.routers.base import ROUTERS
from moejax.routers.learned import (
    GRU_PARAM_NAMES,
    activation_distribution,
    chunk_sparsification_loss,
    cosine_logits,
    cosine_router,
    gru_cell,
    init_cosine_router_params,
    init_gru_params,
    init_recurrent_router_params,
    init_relu_router_params,
    l1_activation_loss,
    recurrent_router,
    relu_router,
    relu_router_activations,
)

D_MODEL, EXPERTS = 16, 6


def _hidden(tokens: int, d_model: int = D_MODEL, seed: int = 0) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((tokens, d_model)), jnp.float32)


# The routers that own parameters, and the options their inits read.
LEARNED_ROUTERS = sorted(name for name, spec in ROUTERS.items() if spec.init_params is not None)
OPTIONS = types.SimpleNamespace(recurrent_state_dim=32)


def _init(name: str, key: jax.Array) -> dict:
    """A layer's parameters, plus those the layers share (the recurrent router's GRU cell)."""
    spec = ROUTERS[name]
    params = spec.init_params(key, D_MODEL, EXPERTS, OPTIONS)
    if spec.init_shared_params is not None:
        params |= spec.init_shared_params(jax.random.fold_in(key, 1), OPTIONS)
    return params


def _route(name: str, hidden: jax.Array, params: dict, top_k: int):
    """Any learned router's Routing; the recurrent one starts from a zero state."""
    route = ROUTERS[name].route
    if name == "recurrent":
        return route(hidden, params, None, top_k=top_k)[0]
    return route(hidden, params, top_k=top_k)


# ------------------------------------------------------------------------ shared contract


@pytest.mark.parametrize("name", LEARNED_ROUTERS)
def test_params_match_declared_axes(name):
    params = _init(name, jax.random.key(0))
    assert set(params) == set(ROUTERS[name].param_axes)
    for key, value in params.items():
        assert value.ndim == len(ROUTERS[name].param_axes[key]), key
        assert value.dtype == jnp.float32, key
    # The only parameter with a d_model dimension is the one named "embed", and it is first.
    embed_params = [k for k, axes in ROUTERS[name].param_axes.items() if "embed" in axes]
    assert len(embed_params) == 1
    assert params[embed_params[0]].shape[0] == D_MODEL


@pytest.mark.parametrize("name", LEARNED_ROUTERS)
def test_routing_contract(name):
    params = _init(name, jax.random.key(1))
    top_k = 3
    result = jax.jit(lambda h, p: _route(name, h, p, top_k))(
        _hidden(24).astype(jnp.bfloat16), params
    )
    chex.assert_shape(result.expert_index, (24, top_k))
    chex.assert_shape(result.combine_weights, (24, top_k))
    chex.assert_shape(result.router_probs, (24, EXPERTS))
    chex.assert_type(result.expert_index, jnp.int32)
    chex.assert_type([result.combine_weights, result.router_probs], jnp.float32)
    assert {"load_balance", "router_z"} <= set(result.aux_losses)
    for value in result.aux_losses.values():
        chex.assert_shape(value, ())
        assert np.isfinite(float(value))
    index = np.asarray(result.expert_index)
    assert ((index >= 0) & (index < EXPERTS)).all()
    # A token's slots name distinct experts.
    assert all(len(set(row)) == top_k for row in index)


@pytest.mark.parametrize("name", LEARNED_ROUTERS)
def test_bad_top_k_names_the_field(name):
    params = _init(name, jax.random.key(0))
    with pytest.raises(ValueError, match="top_k: got 7"):
        _route(name, _hidden(4), params, top_k=EXPERTS + 1)
    with pytest.raises(ValueError, match="hidden: got"):
        _route(name, _hidden(4, d_model=D_MODEL + 1), params, top_k=1)


def test_bad_init_options_name_the_field():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="d_space: got 0"):
        init_cosine_router_params(key, D_MODEL, EXPERTS, d_space=0)
    with pytest.raises(ValueError, match="init_temperature: got 5.0"):
        init_cosine_router_params(key, D_MODEL, EXPERTS, init_temperature=5.0)
    with pytest.raises(ValueError, match="d_state: got -1"):
        init_recurrent_router_params(key, D_MODEL, EXPERTS, d_state=-1)
    with pytest.raises(ValueError, match="num_experts: got 0"):
        init_relu_router_params(key, D_MODEL, 0)


# ------------------------------------------------------------------------ cosine router


def test_cosine_logits_invariant_to_positive_scaling_of_hidden():
    params = init_cosine_router_params(jax.random.key(2), D_MODEL, EXPERTS, d_space=8)
    hidden = _hidden(32)
    reference = cosine_logits(hidden, params)
    for scale in (1e-3, 0.5, 7.0, 1e4):
        np.testing.assert_allclose(cosine_logits(hidden * scale, params), reference, atol=2e-5)


@pytest.mark.parametrize("log_temperature", [np.log(0.07), np.log(0.3), -10.0, 3.0])
def test_cosine_logits_bounded_by_inverse_clamped_temperature(log_temperature):
    params = init_cosine_router_params(jax.random.key(3), D_MODEL, EXPERTS, d_space=8)
    params["log_temperature"] = jnp.asarray(log_temperature, jnp.float32)
    temperature = np.clip(np.exp(log_temperature), 0.01, 1.0)
    # Hidden states along a centroid's preimage reach |cos| = 1, so the bound is attained.
    logits = np.asarray(cosine_logits(_hidden(64, seed=4), params))
    assert np.abs(logits).max() <= (1.0 / temperature) * (1 + 1e-5)


def test_cosine_top1_is_the_centroid_with_largest_cosine_float64_reference():
    params = init_cosine_router_params(jax.random.key(5), D_MODEL, EXPERTS, d_space=8)
    hidden = _hidden(48, seed=6)
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
    hidden = _hidden(16)

    def loss(p):
        return jnp.sum(cosine_router(hidden, p, top_k=2).combine_weights[:, 0])

    assert float(jax.grad(loss)(params)["log_temperature"]) != 0.0
    params["log_temperature"] = jnp.asarray(-10.0, jnp.float32)  # below log(0.01)
    assert float(jax.grad(loss)(params)["log_temperature"]) == 0.0


# ------------------------------------------------------------------------ ReLU + RMSNorm router


def _relu_setup(tokens: int = 32, seed: int = 8):
    """Params with O(1) router weights, so scores clearly cross zero in both directions."""
    params = init_relu_router_params(jax.random.key(seed), D_MODEL, EXPERTS)
    params["w_router"] = params["w_router"] * 25.0
    return params, _hidden(tokens, seed=seed)


def test_relu_inactive_experts_get_exactly_zero_weight():
    params, hidden = _relu_setup()
    # Token 0 is pushed below zero on every expert: it uses no expert at all.
    hidden = hidden.at[0].set(-jnp.sum(params["w_router"], axis=1))
    relu, _ = relu_router_activations(hidden, params)
    result = relu_router(hidden, params, seq_len=8)
    chosen_relu = np.take_along_axis(np.asarray(relu), np.asarray(result.expert_index), axis=1)
    weights = np.asarray(result.combine_weights)
    assert (weights[chosen_relu == 0] == 0).all()
    assert (weights[chosen_relu > 0] > 0).all()
    assert (weights[0] == 0).all() and (np.asarray(result.router_probs)[0] == 0).all()
    # Slots are ordered by activation, so the active ones come first.
    active = weights != 0
    assert (np.sort(active, axis=1)[:, ::-1] == active).all()


def test_relu_number_of_active_experts_varies_per_token():
    params, hidden = _relu_setup(tokens=64)
    result = relu_router(hidden, params)
    active_per_token = np.sum(np.asarray(result.combine_weights) != 0, axis=1)
    assert len(np.unique(active_per_token)) >= 3
    # With top_k = num_experts (the default) no active expert is dropped.
    relu, _ = relu_router_activations(hidden, params)
    np.testing.assert_array_equal(active_per_token, np.sum(np.asarray(relu) > 0, axis=1))


def test_relu_top_k_caps_the_active_experts_at_the_largest_activations():
    params, hidden = _relu_setup()
    relu, _ = relu_router_activations(hidden, params)
    result = relu_router(hidden, params, top_k=2)
    expected = np.argsort(-np.asarray(relu), axis=1, kind="stable")[:, :2]
    active = np.asarray(result.combine_weights) != 0
    np.testing.assert_array_equal(
        np.where(active, np.asarray(result.expert_index), -1), np.where(active, expected, -1)
    )


def test_relu_renormalized_weights_are_activation_shares_summing_to_one():
    params, hidden = _relu_setup()
    result = relu_router(hidden, params, renormalize=True)
    sums = np.sum(np.asarray(result.combine_weights), axis=1)
    np.testing.assert_allclose(sums[sums > 0], 1.0, rtol=1e-5)


def test_relu_sparsity_regulariser_falls_when_activations_are_scaled_down():
    params, hidden = _relu_setup()
    _, activations = relu_router_activations(hidden, params)
    assert float(l1_activation_loss(0.5 * activations)) < float(l1_activation_loss(activations))
    # Through the router: the RMSNorm gain is the activations' scale.
    base = relu_router(hidden, params).aux_losses["relu_sparsity"]
    params["norm_scale"] = params["norm_scale"] * 0.5
    scaled = relu_router(hidden, params).aux_losses["relu_sparsity"]
    np.testing.assert_allclose(scaled, 0.5 * base, rtol=1e-5)


def test_relu_router_gradient_is_finite_and_nonzero_wrt_w_router():
    params, hidden = _relu_setup(tokens=16)
    hidden = hidden.at[0].set(-jnp.sum(params["w_router"], axis=1))  # an all-zero token too
    target = jnp.asarray(np.random.default_rng(9).standard_normal((16, EXPERTS)), jnp.float32)

    def loss(p):
        result = relu_router(hidden, p, seq_len=8, chunk_size=4)
        dense = (
            jnp.zeros((16, EXPERTS))
            .at[jnp.arange(16)[:, None], result.expert_index]
            .add(result.combine_weights)
        )  # [tokens, experts]
        aux = result.aux_losses
        return jnp.sum(dense * target) + aux["relu_sparsity"] + aux["chunk_sparsity_loss"]

    grads = jax.grad(loss)(params)
    for name, grad in grads.items():
        assert np.isfinite(np.asarray(grad)).all(), name
    assert np.abs(np.asarray(grads["w_router"])).max() > 0


def _chunk_loss_reference(probs: np.ndarray, seq_len: int, chunk_size: int) -> float:
    """Float64 loops: mean over (sequence, whole chunk, expert) of P(expert used in chunk)."""
    probs = probs.astype(np.float64)
    used = []
    for start in range(0, probs.shape[0], seq_len):
        sequence = probs[start : start + seq_len]
        for c in range(seq_len // chunk_size):
            chunk = sequence[c * chunk_size : (c + 1) * chunk_size]
            for e in range(probs.shape[1]):
                used.append(1.0 - np.prod(1.0 - chunk[:, e] + 1e-5))
    return float(np.mean(used))


@pytest.mark.parametrize("seq_len, chunk_size", [(12, 4), (12, 5), (12, 1), (12, 12)])
def test_chunk_sparsification_loss_matches_float64_reference(seq_len, chunk_size):
    params, hidden = _relu_setup(tokens=36)
    relu, _ = relu_router_activations(hidden, params)
    probs = activation_distribution(relu)
    loss = chunk_sparsification_loss(probs, seq_len=seq_len, chunk_size=chunk_size)
    expected = _chunk_loss_reference(np.asarray(probs), seq_len, chunk_size)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6)
    routed = relu_router(hidden, params, seq_len=seq_len, chunk_size=chunk_size)
    np.testing.assert_allclose(float(routed.aux_losses["chunk_sparsity_loss"]), float(loss))


def test_chunk_loss_is_lower_when_neighbours_share_experts():
    shared = jnp.tile(jnp.asarray([[0.5, 0.5, 0.0, 0.0]]), (8, 1))
    spread = jnp.asarray([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]] * 4)
    assert float(chunk_sparsification_loss(shared, chunk_size=4)) < float(
        chunk_sparsification_loss(spread, chunk_size=4)
    )


def test_chunk_loss_bad_options_name_the_field():
    probs = jnp.full((12, 4), 0.25)
    with pytest.raises(ValueError, match="seq_len: got 5"):
        chunk_sparsification_loss(probs, seq_len=5)
    with pytest.raises(ValueError, match="chunk_size: got 13"):
        chunk_sparsification_loss(probs, chunk_size=13)


# ------------------------------------------------------------------------ recurrent router


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
    hidden = _hidden(10, seed=14)
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
    hidden = _hidden(10, seed=17)
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
        recurrent_router(_hidden(4), params, jnp.zeros((4, 9)), top_k=1)
