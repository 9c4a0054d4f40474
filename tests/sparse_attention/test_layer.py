"""SparseAttention: each kind equals float64 dense attention under the mask it selected."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from sparse_reference import causal_conv, expand_block_mask, masked_attention, rotary

from moejax.attention import Attention
from moejax.errors import ConfigError
from moejax.sparse_attention import KINDS, AttentionConfig, SparseAttention

D_MODEL, HEADS, KV_HEADS, HEAD_DIM, BASE = 32, 4, 2, 16, 10000.0
LENGTH = 64


def _layer(attention: AttentionConfig, seed: int = 0) -> SparseAttention:
    return SparseAttention(
        D_MODEL,
        HEADS,
        KV_HEADS,
        HEAD_DIM,
        BASE,
        attention=attention,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs=nnx.Rngs(seed),
    )


def _inputs(batch: int = 2, length: int = LENGTH) -> jax.Array:
    return jax.random.normal(jax.random.key(7), (batch, length, D_MODEL))


def _reference(layer: SparseAttention, x, block_mask, block_q, block_kv):
    """The layer's output recomputed densely in float64 under the captured block mask."""
    names = ("w_q", "w_v") if layer.shares_qk else ("w_q", "w_k", "w_v")
    p = {name: np.asarray(getattr(layer, name)[...], np.float64) for name in names}
    x = np.asarray(x, np.float64)
    q = np.einsum("bld,dhk->blhk", x, p["w_q"])
    if layer.shares_qk:  # each kv head's key is the mean of its group's queries
        k = q.reshape(q.shape[:2] + (KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)).mean(axis=3)
    else:
        k = np.einsum("bld,dhk->blhk", x, p["w_k"])
    v = np.einsum("bld,dhk->blhk", x, p["w_v"])
    attention = layer.attention
    if attention.key_conv_width:
        k = causal_conv(k, np.asarray(layer.key_conv[...], np.float64))
    bias = None
    if attention.kind == "dynamic_mask":
        delta = np.asarray(layer.dma_delta[...], np.float64)
        gain = np.asarray(layer.dma_gain[...], np.float64)
        bias = gain * np.logaddexp(0.0, np.einsum("blhd,hd->blh", v, delta))
    q, k = rotary(q, BASE), rotary(k, BASE)
    if layer.shares_qk:  # no token attends to itself: keys and values move one slot later
        k = np.concatenate([np.zeros_like(k[:, :1]), k[:, :-1]], axis=1)
        v = np.concatenate([np.zeros_like(v[:, :1]), v[:, :-1]], axis=1)
    length = x.shape[1]
    pos = np.arange(length)
    mask = expand_block_mask(np.asarray(block_mask), block_q, block_kv) & (
        pos[None] <= pos[:, None]
    )
    if attention.kind == "local":
        mask &= pos[None] > pos[:, None] - attention.options.window
    out = masked_attention(q, k, v, mask, HEAD_DIM**-0.5, bias)
    return np.einsum("blhk,hkd->bld", out, np.asarray(layer.w_o[...], np.float64))


_of = AttentionConfig.of
OPTIONS = {
    "dense": _of("dense", block_size=16),
    "local": _of("local", options={"window": 20}, block_size=16),
    "global_local": _of("global_local", options={"window": 16, "num_global": 8}, block_size=8),
    "moba": _of("moba", options={"top_k": 1}, block_size=16, key_conv_width=3),
    "moba_small_query_blocks": _of(
        "moba", options={"query_block_size": 4, "top_k": 2}, block_size=16
    ),
    "routing": _of("routing", options={"top_k": 2, "window": 8, "num_clusters": 3}, block_size=8),
    "routing_separate_keys": _of(
        "routing",
        options={"top_k": 2, "window": 8, "num_clusters": 3, "shared_qk": False},
        block_size=8,
    ),
    "bilevel": _of("bilevel", options={"top_k": 2}, block_size=8),
    "dynamic_mask": _of("dynamic_mask", options={"top_k": 2, "window": 16}, block_size=8),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_output_equals_float64_masked_attention_under_selected_mask(name):
    options = OPTIONS[name]
    layer = _layer(options)
    if options.key_conv_width:  # a non-identity convolution, so the test sees it
        taps = jax.random.normal(jax.random.key(3), layer.key_conv[...].shape) * 0.5
        layer.key_conv[...] = taps
    x = _inputs()
    forward = nnx.capture(lambda m, x: m(x, train=False, capture=True), nnx.Intermediate)
    (y, metrics), sown = forward(layer, x)
    block_mask = nnx.to_pure_dict(sown)["block_mask"][0]
    expected = _reference(layer, x, block_mask, options.block_q, options.block_size)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=2e-4, atol=2e-4)
    density = float(metrics["attention_density"])
    assert 0.0 < density <= 1.0
    if name == "dense":
        assert density == 1.0
    elif name != "global_local":
        assert density < 1.0


def test_every_kind_is_covered():
    assert {o.kind for o in OPTIONS.values()} == set(KINDS)


def test_moba_with_all_blocks_equals_dense_causal_attention():
    sparse = _layer(_of("moba", options={"top_k": LENGTH // 8}, block_size=8), seed=1)
    dense = Attention(
        D_MODEL, HEADS, KV_HEADS, HEAD_DIM, BASE,
        dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1),
    )  # fmt: skip
    for name in ("w_q", "w_k", "w_v", "w_o"):
        getattr(dense, name)[...] = getattr(sparse, name)[...]
    x = _inputs()
    y, metrics = sparse(x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(dense(x)), rtol=1e-4, atol=1e-4)
    assert float(metrics["attention_density"]) == 1.0


@pytest.mark.parametrize("name", ["moba", "dynamic_mask"])
def test_gradients_are_finite_and_reach_kind_parameters(name):
    layer = _layer(OPTIONS[name])

    def loss(model):
        y, _ = model(_inputs(), train=False)
        return jnp.mean(jnp.square(y))

    grads = nnx.jit(nnx.grad(loss))(layer)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    if name == "moba":
        assert float(jnp.abs(grads["key_conv"][...]).sum()) > 0
    if name == "dynamic_mask":
        assert float(jnp.abs(grads["dma_delta"][...]).sum()) > 0


def test_routing_updates_centroids_only_in_training():
    layer = _layer(OPTIONS["routing"])
    before = np.asarray(layer.centroids[...])
    layer(_inputs(), train=False)
    np.testing.assert_array_equal(np.asarray(layer.centroids[...]), before)
    layer(_inputs(), train=True)
    after = np.asarray(layer.centroids[...])
    assert not np.allclose(after, before)
    np.testing.assert_allclose(np.linalg.norm(after, axis=-1), 1.0, rtol=1e-5)


def test_flux_router_mixes_dense_and_sparse_per_sequence():
    layer = _layer(_of("local", options={"window": 16}, block_size=16, flux_router=True))
    x = _inputs()
    y_full, m_full = layer(x, train=False)  # the router starts preferring full attention
    assert float(m_full["flux_full_share"]) == 1.0
    assert float(m_full["attention_density"]) == 1.0
    layer.flux_router.bias[...] = jnp.full((1,), -5.0)
    y_sparse, m_sparse = layer(x, train=False)
    assert float(m_sparse["flux_full_share"]) == 0.0
    assert not np.allclose(np.asarray(y_full), np.asarray(y_sparse))


@pytest.mark.parametrize(
    ("kind", "options", "shared", "message"),
    [
        ("strided", {}, {}, "attention.kind: got 'strided'; allowed: dense, local"),
        ("dense", {}, {"block_size": 0}, "attention.block_size: got 0"),
        ("moba", {"top_k": 0}, {}, "attention.options.top_k: got 0"),
        ("moba", {"query_block_size": 5}, {}, "attention.options.query_block_size: got 5"),
        ("dense", {}, {"key_conv_width": -1}, "attention.key_conv_width: got -1"),
        ("dense", {}, {"impl": "cuda"}, "attention.impl: got 'cuda'"),
        ("routing", {"centroid_momentum": 1.0}, {}, "attention.options.centroid_momentum: got 1.0"),
    ],
)
def test_bad_options_raise(kind, options, shared, message):
    with pytest.raises(ValueError, match=message):
        AttentionConfig.of(kind, options=options, **shared)


def test_options_of_another_kind_are_refused():
    moba_options = KINDS["moba"].options(top_k=2)
    with pytest.raises(
        ConfigError, match="a LocalOptions \\(the options of attention kind 'local'\\)"
    ):
        AttentionConfig(kind="local", options=moba_options)


def test_length_not_multiple_of_block_is_rejected():
    layer = _layer(_of("moba", block_size=16))
    with pytest.raises(ValueError, match="not a multiple of block_size=16"):
        layer(_inputs(length=40))
