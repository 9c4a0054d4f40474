"""Mixture-of-depths (`moejax.depth.mixture_of_depths`): top-C routing and the causal predictor."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from depth_toy_block import D_MODEL, W_BLOCK, causal_block, depth_inputs
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax import depth


def _causal_block_np(h: np.ndarray) -> np.ndarray:
    z = h @ W_BLOCK  # [n, d]
    steps = np.arange(1, h.shape[0] + 1)[:, None]
    return np.tanh(np.cumsum(z, axis=0) / steps)


def _mod_reference(x, scores, selected_mask, activation="identity"):
    """Float64 loop: each sequence's selected tokens, in order, go through the block."""
    x, scores = np.asarray(x, np.float64), np.asarray(scores, np.float64)
    y = x.copy()
    for b in range(x.shape[0]):
        index = np.flatnonzero(selected_mask[b])
        if index.size == 0:
            continue
        update = _causal_block_np(x[b, index])
        weight = scores[b, index]
        if activation == "sigmoid":
            weight = 1.0 / (1.0 + np.exp(-weight))
        y[b, index] += weight[:, None] * update
    return y


@pytest.mark.parametrize("activation", depth.ROUTER_ACTIVATIONS)
def test_mod_full_capacity_equals_weighted_block_on_all_tokens(activation: str) -> None:
    x, w = depth_inputs(2, 7)
    y, aux = depth.mixture_of_depths(
        x, w, causal_block, capacity_fraction=1.0, router_activation=activation
    )
    r = x @ w  # [batch, length]
    weight = jax.nn.sigmoid(r) if activation == "sigmoid" else r
    np.testing.assert_allclose(y, x + weight[..., None] * causal_block(x), rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(aux["selected_mask"]))


@settings(max_examples=10, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 12),
    fraction=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**16),
)
def test_mod_selects_numpy_top_c_in_order_and_matches_loop_reference(
    batch: int, length: int, fraction: float, seed: int
) -> None:
    x, w = depth_inputs(batch, length, seed)
    # One compiled program per example; eager mode would compile every op separately.
    mod = jax.jit(
        lambda h, r: depth.mixture_of_depths(h, r, causal_block, capacity_fraction=fraction)
    )
    y, aux = mod(x, w)
    capacity = math.ceil(round(fraction * length, 9))
    scores = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    expected_index = np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :capacity], axis=1)
    np.testing.assert_array_equal(aux["selected_index"], expected_index)
    chex.assert_shape(aux["selected_index"], (batch, capacity))
    chex.assert_type(aux["selected_index"], jnp.int32)
    np.testing.assert_array_equal(aux["selected_mask"].sum(axis=1), capacity)
    reference = _mod_reference(x, scores, np.asarray(aux["selected_mask"]))
    np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-5)


def test_mod_unselected_tokens_pass_through_exactly() -> None:
    x, w = depth_inputs(3, 16, seed=1)
    y, aux = depth.mixture_of_depths(x, w, causal_block, capacity_fraction=0.25)
    skipped = ~np.asarray(aux["selected_mask"])
    assert skipped.sum() == 3 * 12
    np.testing.assert_array_equal(np.asarray(y)[skipped], np.asarray(x)[skipped])
    assert not np.allclose(np.asarray(y)[~skipped], np.asarray(x)[~skipped])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mod_shapes_and_dtypes(dtype: jnp.dtype) -> None:
    x, w = depth_inputs(2, 10)
    predictor = depth.init_causal_predictor(jax.random.key(3), D_MODEL, hidden_dim=4)
    y, aux = depth.mixture_of_depths(
        x.astype(dtype), w, causal_block, capacity_fraction=0.3, predictor_params=predictor
    )
    chex.assert_shape(y, (2, 10, D_MODEL))
    chex.assert_type(y, dtype)
    chex.assert_shape(aux["router_scores"], (2, 10))
    chex.assert_type(aux["router_scores"], jnp.float32)
    chex.assert_shape([aux["predictor_loss"], aux["predictor_accuracy"]], ())


def test_mod_gradient_reaches_router_weights() -> None:
    x, w = depth_inputs(2, 9, seed=2)
    fraction = 0.5

    def loss(router_weights: jax.Array) -> jax.Array:
        y, _ = depth.mixture_of_depths(x, router_weights, causal_block, capacity_fraction=fraction)
        return jnp.sum(y)

    grad = jax.grad(loss)(w)
    # y_i = x_i + (x_i . w) u_i on the selected tokens, so d sum(y) / dw = sum_i sum(u_i) x_i.
    _, aux = depth.mixture_of_depths(x, w, causal_block, capacity_fraction=fraction)
    mask = np.asarray(aux["selected_mask"])
    expected = np.zeros(D_MODEL)
    for b in range(2):
        index = np.flatnonzero(mask[b])
        update = _causal_block_np(np.asarray(x[b, index], np.float64))
        expected += (update.sum(axis=1)[:, None] * np.asarray(x[b, index], np.float64)).sum(0)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)
    assert np.linalg.norm(expected) > 0


def test_mod_block_receives_original_positions() -> None:
    x, w = depth_inputs(2, 8, seed=4)
    seen = {}

    def block(h: jax.Array, positions: jax.Array) -> jax.Array:
        seen["positions"] = positions
        return jnp.zeros_like(h)

    _, aux = depth.mixture_of_depths(x, w, block, capacity_fraction=0.5, block_takes_positions=True)
    np.testing.assert_array_equal(seen["positions"], aux["selected_index"])


@pytest.mark.parametrize("hidden_dim", [None, 5])
def test_predictor_loss_and_accuracy_match_numpy_and_train_only_the_predictor(
    hidden_dim: int | None,
) -> None:
    x, w = depth_inputs(2, 12, seed=5)
    predictor = depth.init_causal_predictor(jax.random.key(6), D_MODEL, hidden_dim=hidden_dim)
    _, aux = depth.mixture_of_depths(
        x, w, causal_block, capacity_fraction=0.5, predictor_params=predictor
    )
    logits = np.asarray(depth.causal_predictor_logits(x, predictor), np.float64)
    target = np.asarray(aux["selected_mask"], np.float64)
    prob = 1.0 / (1.0 + np.exp(-logits))
    bce = -np.mean(target * np.log(prob) + (1 - target) * np.log(1 - prob))
    np.testing.assert_allclose(aux["predictor_loss"], bce, rtol=1e-5)
    np.testing.assert_allclose(aux["predictor_accuracy"], np.mean((prob > 0.5) == target))

    def predictor_loss(params, inputs):
        _, out = depth.mixture_of_depths(
            inputs, w, causal_block, capacity_fraction=0.5, predictor_params=params
        )
        return out["predictor_loss"]

    grad_params, grad_x = jax.grad(predictor_loss, argnums=(0, 1))(predictor, x)
    assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grad_params))
    # stop_gradient on the predictor's input: its loss must not shape the residual stream.
    np.testing.assert_array_equal(grad_x, 0.0)


def _predictor_matching_top_c(x: jax.Array, w: jax.Array, capacity: int) -> dict:
    """A linear predictor whose decision boundary sits between the C-th and (C+1)-th score."""
    scores = np.sort(np.asarray(x[0] @ w))[::-1]
    cut = (scores[capacity - 1] + scores[capacity]) / 2
    return {"w": w, "b": jnp.asarray(-cut, jnp.float32)}


def test_causal_decoding_matches_top_c_when_predictor_agrees() -> None:
    x, w = depth_inputs(1, 10, seed=7)
    predictor = _predictor_matching_top_c(x, w, capacity=4)
    y_train, aux_train = depth.mixture_of_depths(x, w, causal_block, capacity_fraction=0.4)
    y_decode, aux_decode = depth.mixture_of_depths_causal(x, w, predictor, causal_block)
    np.testing.assert_array_equal(aux_decode["selected_mask"], aux_train["selected_mask"])
    np.testing.assert_allclose(y_decode, y_train, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux_decode["selected_fraction"], 0.4)


@pytest.mark.parametrize("activation", depth.ROUTER_ACTIVATIONS)
def test_causal_decoding_matches_loop_reference(activation: str) -> None:
    x, w = depth_inputs(3, 11, seed=8)
    predictor = depth.init_causal_predictor(jax.random.key(9), D_MODEL)
    y, aux = depth.mixture_of_depths_causal(
        x, w, predictor, causal_block, router_activation=activation
    )
    mask = np.asarray(aux["selected_mask"])
    assert 0 < mask.sum() < mask.size
    logits = np.asarray(depth.causal_predictor_logits(x, predictor))
    np.testing.assert_array_equal(mask, logits > 0)
    reference = _mod_reference(x, np.asarray(x @ w), mask, activation)
    np.testing.assert_allclose(y, reference, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(y)[~mask], np.asarray(x)[~mask])


def test_mod_rejects_bad_options() -> None:
    x, w = depth_inputs(1, 4)
    predictor = depth.init_causal_predictor(jax.random.key(0), D_MODEL)
    for fraction in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="capacity_fraction"):
            depth.mixture_of_depths(x, w, causal_block, capacity_fraction=fraction)
    with pytest.raises(ValueError, match="router_activation.*identity, sigmoid"):
        depth.mixture_of_depths(x, w, causal_block, capacity_fraction=0.5, router_activation="relu")
    with pytest.raises(ValueError, match="router_weights"):
        depth.mixture_of_depths(x, w[:3], causal_block, capacity_fraction=0.5)
    with pytest.raises(ValueError, match="block_fn"):
        depth.mixture_of_depths(x, w, lambda h: h[:, :1], capacity_fraction=0.5)
    for threshold in (0.0, 1.0):
        with pytest.raises(ValueError, match="threshold"):
            depth.mixture_of_depths_causal(x, w, predictor, causal_block, threshold=threshold)
    with pytest.raises(ValueError, match="predictor_params"):
        depth.causal_predictor_logits(x, {"w": w})


def test_mod_capacity_is_robust_to_float_noise() -> None:
    assert depth.mod_capacity(10, 0.7) == 7
    assert depth.mod_capacity(10, 0.01) == 1
    assert depth.mod_capacity(3, 1.0) == 3
