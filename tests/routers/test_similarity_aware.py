"""The similarity-aware router: a token routes on its probabilities mixed with those of the
earlier tokens its logits resemble."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.routers import graph, similarity_aware
from tests.routers.routing_helpers import key_logits


def test_similarity_router_routes_on_graph_averaged_probs():
    seq_len = 6
    logits = key_logits(2 * seq_len, 5)
    result = similarity_aware.similarity_aware_router(logits, top_k=2, seq_len=seq_len, mix=0.5)
    probs = np.asarray(jax.nn.softmax(logits), np.float64).reshape(2, seq_len, -1)
    s = np.asarray(graph.token_similarity(logits, seq_len=seq_len, temperature=1.0), np.float64)
    expected = (0.5 * probs + 0.5 * np.einsum("bij,bje->bie", s, probs)).reshape(-1, 5)
    np.testing.assert_allclose(result.router_probs, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(
        result.expert_index, np.argsort(-expected, axis=-1, kind="stable")[:, :2]
    )
    np.testing.assert_allclose(jnp.sum(result.combine_weights, -1), 1.0, rtol=1e-6)


def test_similarity_routing_of_a_token_ignores_later_tokens():
    seq_len = 6
    logits = key_logits(seq_len, 5)
    changed = logits.at[4:].set(-logits[4:] * 3.0)
    before = similarity_aware.similarity_aware_router(logits, top_k=2, seq_len=seq_len)
    after = similarity_aware.similarity_aware_router(changed, top_k=2, seq_len=seq_len)
    chex.assert_trees_all_close(before.router_probs[:4], after.router_probs[:4])
    assert not np.allclose(before.router_probs[4:], after.router_probs[4:])


def test_similarity_aware_rejects_bad_inputs():
    logits = key_logits(2 * 6, 5)
    with pytest.raises(ValueError, match="mix"):
        similarity_aware.similarity_aware_router(logits, top_k=2, seq_len=6, mix=1.5)
    with pytest.raises(ValueError, match="seq_len"):
        similarity_aware.similarity_aware_router(logits, top_k=2, seq_len=5)
