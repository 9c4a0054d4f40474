"""The MoE transformer language model: shapes, dtypes, causality, layer layout."""

import dataclasses
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import routers
from moejax.config import load_config_file, with_fields
from moejax.models.layers import MLP, RMSNorm
from moejax.models.moe_layer import MoELayer
from moejax.models.transformer import TransformerLM
from moejax.norms import rms_norm

SMALL = dataclasses.replace(
    load_config_file(Path(__file__).resolve().parents[2] / "configs" / "tiny.py").model,
    num_layers=3,
)


def _tokens(batch=2, length=16, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, 256, jnp.int32)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_forward_shapes_dtypes_and_aux(dispatch, dtype):
    config = with_fields(SMALL, {"moe.dispatch.name": dispatch, "dtype": dtype})
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    logits, aux = model(_tokens())
    chex.assert_shape(logits, (2, 16, 256))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)
    assert len(aux) == 3 and all(a is not None for a in aux)
    chex.assert_shape(aux[0]["expert_load"], (4,))
    np.testing.assert_allclose(float(jnp.sum(aux[0]["expert_load"])), 1.0, rtol=1e-6)
    for name in (
        "aux_loss",
        "load_balance_loss",
        "router_z_loss",
        "dropped_fraction",
        "routing_entropy",
        "load_max_over_mean",
    ):
        chex.assert_shape(aux[0][name], ())


def test_moe_every_second_layer():
    config = with_fields(SMALL, {"num_layers": 4, "moe.every": 2})
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    kinds = [type(block.ffn) for block in model.blocks]
    assert kinds == [MLP, MoELayer, MLP, MoELayer]
    _, aux = model(_tokens())
    assert [a is None for a in aux] == [True, False, True, False]


def test_logits_are_causal():
    model = TransformerLM(SMALL, rngs=nnx.Rngs(1))
    tokens = _tokens(length=12)
    logits, _ = model(tokens)
    edited = tokens.at[:, 8:].set((tokens[:, 8:] + 1) % 256)
    logits_edited, _ = model(edited)
    np.testing.assert_allclose(logits_edited[:, :8], logits[:, :8], rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits_edited[:, 8:], logits[:, 8:])


def test_untrained_model_predicts_near_uniform_bytes():
    model = TransformerLM(SMALL, rngs=nnx.Rngs(2))
    logits, _ = model(_tokens(length=32))
    log_probs = jax.nn.log_softmax(logits)
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1).mean()
    assert float(entropy) > 0.9 * np.log(256)


def test_expert_weights_are_stacked_with_logical_axes():
    model = TransformerLM(SMALL, rngs=nnx.Rngs(0))
    ffn = model.blocks[0].ffn
    chex.assert_shape(ffn.w_gate[...], (4, 32, 32))
    chex.assert_shape(ffn.w_down[...], (4, 32, 32))
    assert ffn.w_gate.get_metadata()["out_sharding"] == ("expert", "embed", "expert_mlp")


def test_rms_norm_matches_numpy():
    x = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    scale = np.linspace(0.5, 2.0, 8).astype(np.float32)
    expected = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(rms_norm(jnp.asarray(x), jnp.asarray(scale)), expected, rtol=1e-5)
    chex.assert_type(
        RMSNorm(8, param_dtype=jnp.float32)(jnp.asarray(x, jnp.bfloat16)), jnp.bfloat16
    )


@pytest.mark.parametrize("router", sorted(routers.ROUTERS))
def test_every_registered_router_trains_inside_the_language_model(router):
    config = with_fields(SMALL, {"num_layers": 1, "router.name": router})
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    graphdef, params, router_state = nnx.split(model, nnx.Param, ...)
    # Pure dicts: the merged model must own fresh variables inside the traced function.
    params, router_state = nnx.to_pure_dict(params), nnx.to_pure_dict(router_state)
    tokens = _tokens(length=16)

    @jax.jit
    def loss_and_grads(params):
        def loss(params):
            logits, aux = nnx.merge(graphdef, params, router_state)(tokens)
            return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux[0]["aux_loss"]

        return jax.value_and_grad(loss)(params)

    value, grads = loss_and_grads(params)
    chex.assert_tree_all_finite((value, grads))
    assert float(_global_norm(grads["blocks"][0]["ffn"]["w_up"])) > 0.0
    logits, aux = nnx.merge(graphdef, params, router_state)(tokens, train=False)
    chex.assert_tree_all_finite(logits)
    np.testing.assert_allclose(float(jnp.sum(aux[0]["expert_load"])), 1.0, rtol=1e-5)


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_shared_experts_and_eval_capacity_factor():
    config = with_fields(
        SMALL,
        {
            "num_layers": 1,
            "moe.num_shared_experts": 2,
            "moe.shared_expert_d_ff": 16,
            "moe.dispatch.name": "capacity",
            "moe.dispatch.options.capacity_factor": 0.25,
            "moe.dispatch.options.eval_capacity_factor": 4.0,
        },
    )
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    chex.assert_shape(model.blocks[0].ffn.shared_w_gate[...], (2, 32, 16))
    tokens = _tokens(length=16)
    _, train_aux = model(tokens, train=True)
    _, eval_aux = model(tokens, train=False)
    assert float(train_aux[0]["dropped_fraction"]) > 0.3
    assert float(eval_aux[0]["dropped_fraction"]) == 0.0


def test_relative_norm_halting_applies_only_at_evaluation():
    tokens = _tokens(length=16)
    never = TransformerLM(with_fields(SMALL, {"moe.halting_threshold": 0.0}), rngs=nnx.Rngs(0))
    always = TransformerLM(with_fields(SMALL, {"moe.halting_threshold": 1e9}), rngs=nnx.Rngs(0))
    _, aux_never = never(tokens, train=False)
    logits_always, aux_always = always(tokens, train=False)
    assert all(float(a["halted_fraction"]) == 0.0 for a in aux_never)
    assert all(float(a["halted_fraction"]) == 1.0 for a in aux_always)
    assert all(float(a["mean_relative_norm"]) > 0.0 for a in aux_never)
    train_never, _ = never(tokens, train=True)
    train_always, aux_train = always(tokens, train=True)
    np.testing.assert_array_equal(train_never, train_always)
    assert "halted_fraction" not in aux_train[0]
    assert not np.allclose(logits_always, train_always)
