"""The layers' constructors with Flax-style defaults, and the errors at their boundary: a wrong
input names the layer, the argument, the shape it got and the shape it expected."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.attention import Attention
from moejax.config import MoEConfig
from moejax.models.moe_layer import MoELayer, RouterContext
from moejax.sparse_attention.layer import SparseAttention

D_MODEL = 8


def _moe(router: str = "softmax_top_k", **kwargs) -> MoELayer:
    return MoELayer(D_MODEL, 16, 4, 2, router=router, rngs=nnx.Rngs(0), **kwargs)


def test_moe_layer_defaults_match_from_config() -> None:
    """The positional constructor and `from_config` (the transformer's) build the same
    parameters, under the same paths, so checkpoints restore either way."""
    moe = MoEConfig(num_experts=4, top_k=2, expert_d_ff=16, num_shared_experts=1)
    direct = _moe(moe=MoEConfig(num_shared_experts=1))
    configured = MoELayer.from_config(D_MODEL, moe, rngs=nnx.Rngs(0))
    direct_state = nnx.to_flat_state(nnx.state(direct))
    configured_state = nnx.to_flat_state(nnx.state(configured))
    assert [path for path, _ in direct_state] == [path for path, _ in configured_state]
    for (_, a), (_, b) in zip(direct_state, configured_state, strict=True):
        np.testing.assert_array_equal(a[...], b[...])
    assert direct.moe == configured.moe
    assert direct.w_gate.dtype == jnp.float32


@pytest.mark.parametrize(
    ("x", "got"),
    [(jnp.ones((6, D_MODEL)), (6, D_MODEL)), (jnp.ones((2, 6, D_MODEL + 1)), (2, 6, D_MODEL + 1))],
    ids=["2-d", "wrong_d_model"],
)
def test_moe_layer_names_a_wrong_input_shape(x: jax.Array, got: tuple[int, ...]) -> None:
    message = f"MoELayer: x.shape: got {got}; allowed: [batch, length, d_model={D_MODEL}]"
    with pytest.raises(ValueError, match=re.escape(message)):
        _moe()(x)


def test_hash_router_without_token_ids_says_how_to_pass_them() -> None:
    layer, x = _moe("hash_layer"), jnp.ones((2, 6, D_MODEL))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "MoELayer router 'hash_layer': context.token_ids: got None; allowed: shape [2, 6], "
            "passed as layer(x, RouterContext(token_ids=...))"
        ),
    ):
        layer(x)
    with pytest.raises(ValueError, match=re.escape("context.token_ids: got 'shape (12,)'")):
        layer(x, RouterContext(token_ids=jnp.zeros((12,), jnp.int32)))


@pytest.mark.parametrize(
    ("moe", "message"),
    [
        (MoEConfig(num_experts=8), "MoELayer moe.num_experts: got 8; allowed: num_experts=4"),
        (MoEConfig(expert_d_ff=32), "MoELayer moe.expert_d_ff: got 32; allowed: d_ff=16"),
    ],
    ids=["num_experts", "expert_d_ff"],
)
def test_moe_layer_names_a_conflict_between_its_arguments_and_moe(moe, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        _moe(moe=moe)


def test_moe_layer_checks_top_k_against_num_experts() -> None:
    with pytest.raises(
        ValueError, match=re.escape("MoELayer top_k: got 5; allowed: an int in [1, num_experts=4]")
    ):
        MoELayer(D_MODEL, 16, 4, 5, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("layer_class", [Attention, SparseAttention])
def test_attention_defaults_and_input_shape_check(layer_class) -> None:
    layer = layer_class(32, 4, rngs=nnx.Rngs(0))
    assert (layer.num_kv_heads, layer.head_dim, layer.rope_base) == (4, 8, 10_000.0)
    name = layer_class.__name__
    with pytest.raises(ValueError, match=re.escape(f"{name}: x.shape: got (2, 16, 31); allowed")):
        layer(jnp.ones((2, 16, 31)))
    with pytest.raises(ValueError, match=re.escape(f"{name} num_kv_heads: got 3; allowed")):
        layer_class(32, 4, 3, rngs=nnx.Rngs(0))


def test_attention_names_wrong_positions() -> None:
    layer = Attention(32, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=re.escape("Attention: positions.shape: got (16,)")):
        layer(jnp.ones((2, 16, 32)), jnp.arange(16))
