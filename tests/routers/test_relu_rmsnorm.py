"""The ReLU + RMSNorm router (BlockFFN): a varying number of active experts per token, and its
token- and chunk-level sparsity objectives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.routers.relu_rmsnorm import (
    activation_distribution,
    chunk_sparsification_loss,
    init_relu_router_params,
    l1_activation_loss,
    relu_router,
    relu_router_activations,
)
from tests.routers.layer_helpers import hidden, make_layer
from tests.routers.routing_helpers import D_MODEL, EXPERTS, hidden_states


def test_bad_init_options_name_the_field():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="num_experts: got 0"):
        init_relu_router_params(key, D_MODEL, 0)


def _relu_setup(tokens: int = 32, seed: int = 8):
    """Params with O(1) router weights, so scores clearly cross zero in both directions."""
    params = init_relu_router_params(jax.random.key(seed), D_MODEL, EXPERTS)
    params["w_router"] = params["w_router"] * 25.0
    return params, hidden_states(tokens, seed=seed)


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


def test_layer_weighs_each_sparsity_loss_by_its_own_option():
    """In the MoE layer, the token-level loss takes `sparsity_weight` and the chunk-level loss
    `chunk_sparsity_weight` (distinct weights, so swapping them shows)."""
    layer = make_layer(
        "relu_rmsnorm",
        options={"sparsity_weight": 0.3, "chunk_sparsity_weight": 0.7},
        load_balance_weight=0.05,
        router_z_weight=0.002,
    )
    _, aux, _ = layer(hidden(length=16), train=True)
    assert float(aux["relu_sparsity_loss"]) > 0 and float(aux["chunk_sparsity_loss"]) > 0
    assert float(aux["relu_sparsity_loss"]) != pytest.approx(float(aux["chunk_sparsity_loss"]))
    expected = (
        0.05 * aux["load_balance_loss"]
        + 0.002 * aux["router_z_loss"]
        + 0.3 * aux["relu_sparsity_loss"]
        + 0.7 * aux["chunk_sparsity_loss"]
    )
    np.testing.assert_allclose(aux["aux_loss"], expected, rtol=1e-6)
