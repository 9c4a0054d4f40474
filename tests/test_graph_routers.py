"""Graph-of-tokens routers: the mixed distribution, causality, and the plain-softmax limits."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing
from moejax.routers import attention_aware, graph, similarity_aware


def _logits(batch=2, seq_len=6, experts=5, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch * seq_len, experts)) * 2.0


def test_similarity_graph_matches_float64_loop():
    batch, seq_len, experts, temperature = 2, 5, 4, 0.7
    logits = _logits(batch, seq_len, experts)
    got = np.asarray(graph.token_similarity(logits, seq_len=seq_len, temperature=temperature))
    z = np.asarray(logits, np.float64).reshape(batch, seq_len, experts)
    for b in range(batch):
        for i in range(seq_len):
            scores = np.array(
                [z[b, i] @ z[b, j] / (temperature * np.sqrt(experts)) for j in range(i + 1)]
            )
            row = np.exp(scores - scores.max())
            row /= row.sum()
            np.testing.assert_allclose(got[b, i, : i + 1], row, rtol=2e-5, atol=1e-7)
            np.testing.assert_array_equal(got[b, i, i + 1 :], 0.0)


def test_similarity_router_routes_on_graph_averaged_probs():
    seq_len = 6
    logits = _logits(seq_len=seq_len)
    result = similarity_aware.similarity_aware_router(logits, top_k=2, seq_len=seq_len, mix=0.5)
    probs = np.asarray(jax.nn.softmax(logits), np.float64).reshape(2, seq_len, -1)
    s = np.asarray(graph.token_similarity(logits, seq_len=seq_len, temperature=1.0), np.float64)
    expected = (0.5 * probs + 0.5 * np.einsum("bij,bje->bie", s, probs)).reshape(-1, 5)
    np.testing.assert_allclose(result.router_probs, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(
        result.expert_index, np.argsort(-expected, axis=-1, kind="stable")[:, :2]
    )
    np.testing.assert_allclose(jnp.sum(result.combine_weights, -1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("name", ["similarity_aware", "attention_aware"])
def test_mix_zero_is_softmax_top_k(name):
    logits = _logits()
    options = {"seq_len": 6} if name == "similarity_aware" else {}
    if name == "attention_aware":
        options["attention_probs"] = jax.nn.softmax(jax.random.normal(jax.random.key(1), (2, 6, 6)))
    got = routing.get_router(name)(logits, top_k=2, mix=0.0, **options)
    want = routing.softmax_top_k(logits, top_k=2)
    np.testing.assert_array_equal(got.expert_index, want.expert_index)
    np.testing.assert_allclose(got.combine_weights, want.combine_weights, rtol=1e-6)


def test_attention_aware_with_identity_attention_is_softmax_top_k():
    logits = _logits()
    identity = jnp.broadcast_to(jnp.eye(6), (2, 6, 6))
    got = attention_aware.attention_aware_router(logits, top_k=3, attention_probs=identity)
    want = routing.softmax_top_k(logits, top_k=3)
    np.testing.assert_array_equal(got.expert_index, want.expert_index)
    np.testing.assert_allclose(got.router_probs, want.router_probs, rtol=1e-6)


def test_similarity_routing_of_a_token_ignores_later_tokens():
    seq_len = 6
    logits = _logits(batch=1, seq_len=seq_len)
    changed = logits.at[4:].set(-logits[4:] * 3.0)
    before = similarity_aware.similarity_aware_router(logits, top_k=2, seq_len=seq_len)
    after = similarity_aware.similarity_aware_router(changed, top_k=2, seq_len=seq_len)
    chex.assert_trees_all_close(before.router_probs[:4], after.router_probs[:4])
    assert not np.allclose(before.router_probs[4:], after.router_probs[4:])


def test_graph_routers_reject_bad_inputs():
    logits = _logits()
    with pytest.raises(ValueError, match="mix"):
        similarity_aware.similarity_aware_router(logits, top_k=2, seq_len=6, mix=1.5)
    with pytest.raises(ValueError, match="seq_len"):
        similarity_aware.similarity_aware_router(logits, top_k=2, seq_len=5)
    with pytest.raises(ValueError, match="attention_probs"):
        attention_aware.attention_aware_router(logits, top_k=2)
    with pytest.raises(ValueError, match="attention_probs"):
        attention_aware.attention_aware_router(logits, top_k=2, attention_probs=jnp.ones((2, 5, 5)))
