"""The attention-aware router reads the attention graph row by row: a token routes like the
tokens it attends to, so its routing never depends on a later token; identity attention is plain
softmax top-k."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.attention import causal_attention
from moejax.config import load_config_file, with_fields
from moejax.models.transformer import TransformerLM
from moejax.routers.attention_aware import attention_aware_router
from moejax.routers.softmax_top_k import softmax_top_k
from tests.routers.routing_helpers import key_logits

BATCH, LENGTH, D_MODEL, HEADS, HEAD_DIM, EXPERTS = 2, 8, 12, 2, 4, 6


def _weights(seed: int = 0) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(seed), 4)
    return {
        "router": jax.random.normal(keys[0], (D_MODEL, EXPERTS)),
        **{
            name: jax.random.normal(key, (D_MODEL, HEADS, HEAD_DIM)) * D_MODEL**-0.5
            for name, key in zip("qkv", keys[1:], strict=True)
        },
    }


def _route(x: jax.Array, weights: dict[str, jax.Array], mix: float = 1.0):
    """Router logits and a causal attention graph from hidden states `x [batch, L, d_model]`."""
    q, k, v = (jnp.einsum("bld,dhk->blhk", x, weights[name]) for name in "qkv")
    _, attention_probs = causal_attention(q, k, v, return_probs=True)  # [batch, L, L]
    logits = x.reshape(-1, D_MODEL) @ weights["router"]  # [tokens, experts]
    return attention_aware_router(logits, top_k=2, attention_probs=attention_probs, mix=mix)


def test_attention_aware_mixes_each_token_with_the_tokens_it_attends_to() -> None:
    logits = jax.random.normal(jax.random.key(1), (BATCH * LENGTH, EXPERTS)) * 2.0
    raw = np.asarray(jax.random.uniform(jax.random.key(2), (BATCH, LENGTH, LENGTH)), np.float64)
    graph = np.tril(raw)
    graph /= graph.sum(-1, keepdims=True)  # causal and far from symmetric
    mix = 0.75
    got = attention_aware_router(
        logits, top_k=2, attention_probs=jnp.asarray(graph, jnp.float32), mix=mix
    )
    probs = np.asarray(jax.nn.softmax(logits), np.float64).reshape(BATCH, LENGTH, EXPERTS)
    want = np.zeros_like(probs)
    for b in range(BATCH):
        for i in range(LENGTH):
            attended = sum(graph[b, i, j] * probs[b, j] for j in range(i + 1))
            want[b, i] = (1 - mix) * probs[b, i] + mix * attended
    want = want.reshape(-1, EXPERTS)
    np.testing.assert_allclose(got.router_probs, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(got.expert_index, np.argsort(-want, axis=-1)[:, :2])


def test_attention_aware_routing_of_a_token_ignores_later_tokens() -> None:
    weights = _weights()
    x = jax.random.normal(jax.random.key(3), (BATCH, LENGTH, D_MODEL))
    for t in (0, 3, LENGTH - 2):
        edited = x.at[:, t + 1 :].set(-3.0 * x[:, t + 1 :] + 1.0)
        before, after = _route(x, weights), _route(edited, weights)
        earlier = (jnp.arange(BATCH * LENGTH) % LENGTH) <= t  # [tokens]
        for field in ("router_probs", "combine_weights", "expert_index"):
            a, b = getattr(before, field), getattr(after, field)
            np.testing.assert_allclose(a[earlier], b[earlier], rtol=1e-6, atol=1e-7, err_msg=field)
        assert not np.allclose(before.router_probs[~earlier], after.router_probs[~earlier])


def test_language_model_with_attention_aware_routing_is_causal() -> None:
    tiny = load_config_file(Path(__file__).resolve().parents[2] / "configs" / "tiny.py").model
    config = with_fields(tiny, {"num_layers": 2, "router.name": "attention_aware"})
    model = TransformerLM(config, rngs=nnx.Rngs(4))
    tokens = jax.random.randint(jax.random.key(5), (2, 12), 0, 256, jnp.int32)
    logits, _ = model(tokens)
    edited = tokens.at[:, 7:].set((tokens[:, 7:] + 1) % 256)
    logits_edited, _ = model(edited)
    np.testing.assert_allclose(logits_edited[:, :7], logits[:, :7], rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits_edited[:, 7:], logits[:, 7:])


def test_attention_aware_with_identity_attention_is_softmax_top_k():
    logits = key_logits(2 * 6, 5)
    identity = jnp.broadcast_to(jnp.eye(6), (2, 6, 6))
    got = attention_aware_router(logits, top_k=3, attention_probs=identity)
    want = softmax_top_k(logits, top_k=3)
    np.testing.assert_array_equal(got.expert_index, want.expert_index)
    np.testing.assert_allclose(got.router_probs, want.router_probs, rtol=1e-6)


def test_attention_aware_rejects_missing_or_misshapen_attention_probs():
    logits = key_logits(2 * 6, 5)
    with pytest.raises(ValueError, match="attention_probs"):
        attention_aware_router(logits, top_k=2)
    with pytest.raises(ValueError, match="attention_probs"):
        attention_aware_router(logits, top_k=2, attention_probs=jnp.ones((2, 5, 5)))
