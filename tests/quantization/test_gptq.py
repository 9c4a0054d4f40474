"""GPTQ rounding against a float64 loop reference (one input at a time, static group scales),
and its lower output error than plain rounding on correlated inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.quantization import dequantize, gptq_quantize, quantize


def _layer(seed: int, d_in: int = 16, d_out: int = 5, tokens: int = 256):
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d_in, d_in)) / np.sqrt(d_in) + np.eye(d_in)
    return rng.normal(size=(d_in, d_out)), rng.normal(size=(tokens, d_in)) @ mixing


def _reference(w, x, bits, group_size, symmetric, damp=0.01):
    q = quantize(jnp.asarray(w), bits, group_size, symmetric)
    scales = np.repeat(np.asarray(q.scales), group_size, 0)
    zeros = 0 * scales if q.zeros is None else np.repeat(np.asarray(q.zeros), group_size, 0)
    low = -(2 ** (bits - 1)) + (1 if symmetric else 0)
    h = x.T @ x
    h = h + damp * np.mean(np.diag(h)) * np.eye(len(h))
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T
    w, codes = w.copy(), np.zeros_like(w)
    for i in range(len(w)):
        codes[i] = np.clip(np.round(w[i] / scales[i]) + zeros[i], low, 2 ** (bits - 1) - 1)
        error = (w[i] - (codes[i] - zeros[i]) * scales[i]) / hinv[i, i]
        w[i:] -= np.outer(hinv[i, i:], error)
    return codes


@pytest.mark.parametrize(("bits", "symmetric"), [(3, True), (4, False)])
def test_gptq_matches_the_float64_loop_reference(bits, symmetric):
    w, x = _layer(bits)
    with jax.enable_x64(True):
        q = gptq_quantize(jnp.asarray(w), jnp.asarray(x.T @ x), bits, 8, symmetric=symmetric)
        expected = _reference(w, x, bits, 8, symmetric)
    np.testing.assert_array_equal(np.asarray(q.codes), expected)


def test_gptq_lowers_the_output_error_of_plain_rounding():
    w, x = _layer(7, d_in=32, d_out=8)
    w32, x32 = jnp.asarray(w, jnp.float32), jnp.asarray(x, jnp.float32)
    plain = dequantize(quantize(w32, 3, 16))
    fitted = dequantize(gptq_quantize(w32, x32.T @ x32, 3, 16))
    error = [float(jnp.sum((x32 @ (w32 - w_hat)) ** 2)) for w_hat in (plain, fitted)]
    assert error[1] < 0.8 * error[0], error


def test_gptq_rejects_a_hessian_of_the_wrong_size():
    with pytest.raises(ValueError, match="hessian.shape"):
        gptq_quantize(jnp.ones((8, 2)), jnp.eye(4), 4, 4)
