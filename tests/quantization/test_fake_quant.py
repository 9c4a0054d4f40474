"""Per-group fake quantisation against a float64 numpy reference: codes, scales, zero points,
the half-step error bound, exact round trips on the grid and the straight-through gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.quantization import (
    dequantize,
    fake_quant,
    fake_quant_activations,
    quantize,
)


def _reference(w, bits, group_size, symmetric):
    """(codes, scales, zeros, w_hat) in float64, one group at a time."""
    d_in, d_out = w.shape
    codes = np.zeros_like(w)
    scales = np.zeros((d_in // group_size, d_out))
    zeros = np.zeros_like(scales)
    for g in range(d_in // group_size):
        for j in range(d_out):
            group = w[g * group_size : (g + 1) * group_size, j]
            if symmetric:
                qmax = 2 ** (bits - 1) - 1
                scale = np.abs(group).max() / qmax
                codes_g, zero = np.round(group / scale), 0.0
            else:
                scale = (group.max() - group.min()) / (2**bits - 1)
                zero = -(2 ** (bits - 1)) - np.round(group.min() / scale)
                codes_g = np.round(group / scale) + zero
            codes[g * group_size : (g + 1) * group_size, j] = codes_g
            scales[g, j], zeros[g, j] = scale, zero
    w_hat = (codes - np.repeat(zeros, group_size, 0)) * np.repeat(scales, group_size, 0)
    return codes, scales, zeros, w_hat


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("bits", "group_size"), [(2, 8), (3, 16), (4, 8), (8, 32)])
def test_quantize_matches_the_float64_reference_within_half_a_step(bits, group_size, symmetric):
    w = np.random.default_rng(bits).normal(size=(32, 6))
    with jax.enable_x64(True):
        q = quantize(jnp.asarray(w), bits, group_size, symmetric)
        w_hat = np.asarray(dequantize(q))
    codes, scales, zeros, expected = _reference(w, bits, group_size, symmetric)
    assert q.codes.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(q.codes), codes)
    np.testing.assert_allclose(np.asarray(q.scales), scales, rtol=1e-12)
    if symmetric:
        assert q.zeros is None
    else:
        np.testing.assert_array_equal(np.asarray(q.zeros), zeros)
    np.testing.assert_allclose(w_hat, expected, rtol=1e-12, atol=1e-15)
    step = np.repeat(scales, group_size, 0)
    assert np.all(np.abs(w - w_hat) <= step / 2 * (1 + 1e-9))


@pytest.mark.parametrize("symmetric", [True, False])
def test_values_on_the_grid_come_back_exactly(symmetric):
    rng = np.random.default_rng(0)
    bits, group_size = 4, 8
    codes = rng.integers(-7, 8, size=(16, 5)).astype(np.float64)
    codes[::group_size] = 7  # every group reaches the top code
    codes[1::group_size] = -7 if symmetric else -8  # and the bottom
    w = codes * 0.125  # a power of two: every product is exact
    with jax.enable_x64(True):
        w_hat = np.asarray(dequantize(quantize(jnp.asarray(w), bits, group_size, symmetric)))
    np.testing.assert_array_equal(w_hat, w)


def test_symmetric_int4_codes_lie_in_range_and_each_group_max_maps_to_seven():
    w = np.random.default_rng(1).normal(size=(64, 8)).astype(np.float32)
    q = quantize(jnp.asarray(w), 4, 16)
    codes = np.asarray(q.codes)
    assert codes.min() >= -8 and codes.max() <= 7
    grouped = np.abs(codes).reshape(4, 16, 8).max(axis=1)
    np.testing.assert_array_equal(grouped, 7)
    # The largest |w| of each group is the one on ±7, with its sign.
    argmax = np.abs(w).reshape(4, 16, 8).argmax(axis=1)
    signs = np.take_along_axis(np.sign(w).reshape(4, 16, 8), argmax[:, None], 1)[:, 0]
    at_max = np.take_along_axis(codes.reshape(4, 16, 8), argmax[:, None], 1)[:, 0]
    np.testing.assert_array_equal(at_max, 7 * signs)


def test_asymmetric_codes_span_the_full_range_of_every_group():
    w = np.random.default_rng(2).normal(size=(32, 4)).astype(np.float32) + 3.0  # all positive
    q = quantize(jnp.asarray(w), 4, 8, symmetric=False)
    codes = np.asarray(q.codes).reshape(4, 8, 4)
    np.testing.assert_array_equal(codes.min(axis=1), -8)
    np.testing.assert_array_equal(codes.max(axis=1), 7)
    step = np.repeat(np.asarray(q.scales), 8, 0)
    assert np.all(np.abs(np.asarray(dequantize(q)) - w) <= step / 2 * (1 + 1e-5))


@pytest.mark.parametrize("symmetric", [True, False])
def test_constant_and_zero_groups_come_back(symmetric):
    w = np.zeros((8, 3), np.float32)
    w[:4, 1] = -0.3
    w[4:, 2] = 1.7
    w_hat = np.asarray(fake_quant(jnp.asarray(w), 3, 4, symmetric))
    np.testing.assert_array_equal(w_hat[w == 0], 0.0)
    if symmetric:  # the scale is c / 3, and 3 * (c / 3) may be off by one ulp
        np.testing.assert_allclose(w_hat, w, rtol=1e-6)
    else:  # the scale is |c| itself
        np.testing.assert_array_equal(w_hat, w)


def test_stacked_experts_quantise_each_expert_on_its_own():
    w = jax.random.normal(jax.random.key(0), (3, 16, 8))  # [experts, d_model, d_ff]
    stacked = quantize(w, 4, 8)
    for e in range(3):
        alone = quantize(w[e], 4, 8)
        np.testing.assert_array_equal(stacked.codes[e], alone.codes)
        np.testing.assert_array_equal(stacked.scales[e], alone.scales)


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quant_is_dequantize_forward_and_identity_backward(symmetric):
    w = jax.random.normal(jax.random.key(1), (16, 4), jnp.bfloat16)
    cotangent = jax.random.normal(jax.random.key(2), (16, 4), jnp.bfloat16)
    out, vjp = jax.vjp(lambda v: fake_quant(v, 3, 8, symmetric), w)
    assert out.dtype == jnp.bfloat16
    expected = dequantize(quantize(w, 3, 8, symmetric)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(expected, np.float32))
    np.testing.assert_array_equal(
        np.asarray(vjp(cotangent)[0], np.float32), np.asarray(cotangent, np.float32)
    )


def test_activation_fake_quant_has_one_scale_per_token():
    x = jnp.asarray([[1.0, -0.5, 0.26], [100.0, 3.0, -40.0]])
    x_hat = np.asarray(fake_quant_activations(x, 3))  # levels ±3: steps 1/3 and 100/3
    np.testing.assert_allclose(x_hat, [[1.0, -2 / 3, 1 / 3], [100.0, 0.0, -100 / 3]], rtol=1e-6)
    grad = jax.grad(lambda v: jnp.sum(fake_quant_activations(v, 3) * 2.0))(x)
    np.testing.assert_array_equal(np.asarray(grad), 2.0)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((jnp.ones((8, 4)), 1, 4), "bits"),
        ((jnp.ones((8, 4)), 9, 4), "bits"),
        ((jnp.ones((8, 4)), 4, 3), "group_size"),
        ((jnp.ones((8, 4)), 4, 0), "group_size"),
        ((jnp.ones(8), 4, 4), "w.shape"),
    ],
)
def test_bad_arguments_name_the_field(args, field):
    with pytest.raises(ValueError, match=field):
        quantize(*args)
    with pytest.raises(ValueError, match=field):
        fake_quant(*args)
