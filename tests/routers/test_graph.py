"""What the graph-of-tokens routers share (routers/graph.py): the causal similarity graph, and
plain softmax top-k when nothing is mixed in."""

import jax
import numpy as np
import pytest

from moejax.routers import graph
from moejax.routers.base import get as get_router_spec
from moejax.routers.softmax_top_k import softmax_top_k
from tests.routers.routing_helpers import key_logits


def test_similarity_graph_matches_float64_loop():
    batch, seq_len, experts, temperature = 2, 5, 4, 0.7
    logits = key_logits(batch * seq_len, experts)
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


@pytest.mark.parametrize("name", ["similarity_aware", "attention_aware"])
def test_mix_zero_is_softmax_top_k(name):
    logits = key_logits(2 * 6, 5)
    options = {"seq_len": 6} if name == "similarity_aware" else {}
    if name == "attention_aware":
        options["attention_probs"] = jax.nn.softmax(jax.random.normal(jax.random.key(1), (2, 6, 6)))
    got = get_router_spec(name).route(logits, top_k=2, mix=0.0, **options)
    want = softmax_top_k(logits, top_k=2)
    np.testing.assert_array_equal(got.expert_index, want.expert_index)
    np.testing.assert_allclose(got.combine_weights, want.combine_weights, rtol=1e-6)
