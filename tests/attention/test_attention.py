"""Causal grouped-query attention and rotary positions against float64 references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.attention import Attention, causal_attention
from moejax.rotary import apply_rotary, rotary_angles


def _reference_attention(q, k, v):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    batch, length, heads, head_dim = q.shape
    group = heads // k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            logits = q[b, :, h] @ k[b, :, h // group].T / np.sqrt(head_dim)
            logits[np.triu_indices(length, 1)] = -np.inf
            weights = np.exp(logits - logits.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            out[b, :, h] = weights @ v[b, :, h // group]
    return out


_causal_attention = jax.jit(causal_attention)


@settings(max_examples=15, deadline=None)
@given(length=st.integers(1, 9), kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]))
def test_causal_attention_matches_float64_reference(length, kv_heads, group):
    # numpy draws and one jitted call: each drawn shape compiles once, not op by op.
    rng = np.random.default_rng(length * 7 + group)
    heads, head_dim = kv_heads * group, 8
    q = rng.normal(size=(2, length, heads, head_dim)).astype(np.float32)
    k, v = rng.normal(size=(2, 2, length, kv_heads, head_dim)).astype(np.float32)
    out = _causal_attention(q, k, v)
    chex.assert_shape(out, (2, length, heads, head_dim))
    np.testing.assert_allclose(out, _reference_attention(q, k, v), rtol=2e-5, atol=2e-5)


def test_rotary_scores_depend_only_on_relative_position():
    head_dim = 16
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, head_dim))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, head_dim))

    def score(m, n):
        qm = apply_rotary(q, rotary_angles(jnp.array([m]), head_dim, 10_000.0))
        kn = apply_rotary(k, rotary_angles(jnp.array([n]), head_dim, 10_000.0))
        return float(jnp.sum(qm * kn))

    np.testing.assert_allclose(score(3, 1), score(10, 8), rtol=1e-5)
    np.testing.assert_allclose(score(0, 0), float(jnp.sum(q * k)), rtol=1e-5)
    assert abs(score(5, 0) - score(0, 0)) > 1e-4


def test_attention_layer_is_causal_and_keeps_dtype():
    layer = Attention(
        32, 4, 2, 8, 10_000.0, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0)
    )
    x = jax.random.normal(jax.random.key(2), (2, 6, 32))
    y = layer(x)
    chex.assert_shape(y, (2, 6, 32))
    chex.assert_type(y, jnp.bfloat16)
    changed = x.at[:, 4:].set(0.0)
    np.testing.assert_array_equal(layer(changed)[:, :4], y[:, :4])
