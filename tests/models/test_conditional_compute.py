"""Routers and depth routers wired into the language model: noise keys, the recurrent state,
graph routing, capacity schedules, mixture-of-depths and Dr.LLM layer routers."""

import dataclasses
import functools
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import depth
from moejax.config import ConfigError, load_config_file, with_fields
from moejax.models.moe_layer import RouterContext
from moejax.models.transformer import TransformerLM
from moejax.moe import capacity_schedule
from moejax.routers.recurrent import gru_cell

SMALL = dataclasses.replace(
    load_config_file(Path(__file__).resolve().parents[2] / "configs" / "tiny.py").model,
    num_layers=2,
)


def _model(changes: dict | None = None) -> TransformerLM:
    """The tiny model with `changes` (dotted paths within `model`, e.g. "depth.mod_every")."""
    return TransformerLM(with_fields(SMALL, changes or {}), rngs=nnx.Rngs(0))


def _tokens(batch=2, length=16, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, 256, jnp.int32)


@functools.partial(nnx.jit, static_argnames="train")
def _forward(model, tokens, *, train=True, rng=None, layer_decisions=None):
    """`model(tokens, ...)`, compiled once per model and mode: called eagerly, the model runs as
    hundreds of small operations, each compiled on its first use."""
    return model(tokens, train=train, rng=rng, layer_decisions=layer_decisions)


def _loss(model, tokens, **kwargs):
    logits, aux = model(tokens, **kwargs)
    log_probs = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], -1))
    return nll + sum(a["aux_loss"] for a in aux if a is not None)


@pytest.mark.parametrize(
    "router", ["noisy_top_k", "top_p", "similarity_aware", "attention_aware", "recurrent"]
)
def test_router_trains_inside_the_model(router):
    # One layer shows a router training; the recurrent router needs a second to carry its state to.
    layers = 2 if router == "recurrent" else 1
    model = _model({"router.name": router, "num_layers": layers})
    tokens = _tokens()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return _loss(nnx.merge(graphdef, p, rest), tokens, rng=jax.random.key(1))

    # Compiled, as in the train step: eager autodiff compiles each operation of both passes.
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert np.isfinite(float(value))
    router_grads = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(grads)
        if "router" in jax.tree_util.keystr(path)
    ]
    assert router_grads and any(float(jnp.max(jnp.abs(g))) > 0 for g in router_grads)


def test_noisy_routing_follows_the_key_and_is_off_at_eval():
    model = _model({"router.name": "noisy_top_k", "moe.top_k": 1, "num_layers": 1})
    tokens = _tokens()
    first = _forward(model, tokens, rng=jax.random.key(1))[0]
    chex.assert_trees_all_equal(first, _forward(model, tokens, rng=jax.random.key(1))[0])
    assert not np.allclose(first, _forward(model, tokens, rng=jax.random.key(2))[0])
    clean = _forward(model, tokens, train=False)[0]
    chex.assert_trees_all_close(
        clean, _forward(model, tokens, train=False, rng=jax.random.key(2))[0]
    )


def test_recurrent_router_reads_and_returns_the_gru_state():
    model = _model({"router.name": "recurrent", "router.options.state_dim": 8})
    layer = model.blocks[1].ffn
    shared = {name: value[...] for name, value in model.router_gru.items()}
    x = jax.random.normal(jax.random.key(3), (2, 4, SMALL.d_model))
    previous = jax.random.normal(jax.random.key(4), (8, 8))
    _, _, fresh = layer(x, RouterContext(shared_router_params=shared))
    _, _, carried = layer(x, RouterContext(recurrent_state=previous, shared_router_params=shared))
    hidden = x.reshape(8, -1) @ layer.router_params["w_proj"][...]
    chex.assert_trees_all_close(carried, gru_cell(shared, previous, hidden), atol=1e-6)
    chex.assert_trees_all_close(fresh, gru_cell(shared, jnp.zeros((8, 8)), hidden), atol=1e-6)
    # One GRU cell for the whole model; each layer keeps only its projections.
    assert set(layer.router_params) == {"w_proj", "w_out"}


def test_capacity_schedule_sets_each_moe_layer():
    model = _model(
        {
            "num_layers": 4,
            "moe.dispatch.name": "capacity",
            "moe.dispatch.options.schedule": "descending",
            "moe.dispatch.options.capacity_factor": 1.5,
        }
    )
    factors = [block.ffn.dispatch.options.capacity_factor for block in model.blocks]
    assert factors == list(capacity_schedule(4, 1.5, "descending", 0.5))
    assert factors[0] > factors[-1]


def test_mixture_of_depths_at_full_capacity_is_the_gated_block():
    model = _model({"depth.mod_every": 1, "depth.mod_capacity": 1.0})
    plain = _model()
    tokens = _tokens()
    x = model.embed(tokens)
    block = model.blocks[0]
    got, aux, _ = block(x, RouterContext(token_ids=tokens))
    update, _, _ = block.residual_update(x, RouterContext(token_ids=tokens), train=True)
    gate = jax.nn.sigmoid(depth.mod_router_scores(x, block.mod_router[...]))
    chex.assert_trees_all_close(got, x + gate[..., None] * update, atol=1e-5)
    assert float(aux["mod_selected_fraction"]) == 1.0
    assert "mod_predictor_loss" in aux and len(jax.tree.leaves(nnx.state(plain))) > 0


def test_mixture_of_depths_selects_its_share_and_trains_the_predictor():
    model = _model({"depth.mod_every": 2, "depth.mod_capacity": 0.25})
    tokens = _tokens(length=16)
    _, aux = _forward(model, tokens)
    assert aux[0] is not None and "mod_selected_fraction" not in aux[0]
    assert float(aux[1]["mod_selected_fraction"]) == 0.25
    assert "top1_expert" in aux[0] and "top1_expert" not in aux[1]
    assert float(aux[1]["aux_loss"]) > 0.1 * float(aux[1]["mod_predictor_loss"]) - 1e-6
    _, eval_aux = _forward(model, tokens, train=False)
    assert 0.0 <= float(eval_aux[1]["mod_selected_fraction"]) <= 1.0


def test_mixture_of_depths_output_is_causal():
    model = _model({"depth.mod_every": 1, "depth.mod_capacity": 0.5})
    tokens = _tokens(batch=1, length=16)
    changed = tokens.at[0, 12:].set((tokens[0, 12:] + 7) % 256)
    # Top-C looks at the whole sequence; the evaluation path (causal predictor) must not.
    before = _forward(model, tokens, train=False)[0]
    after = _forward(model, changed, train=False)[0]
    chex.assert_trees_all_close(before[:, :12], after[:, :12], atol=1e-5)


def test_layer_router_decisions_skip_execute_repeat():
    model = _model({"depth.layer_router_dim": 8})
    tokens = _tokens()
    executed = _forward(model, tokens)[0]  # training never routes layers
    all_execute = jnp.full((2, 2), depth.EXECUTE)
    chex.assert_trees_all_close(
        _forward(model, tokens, layer_decisions=all_execute)[0], executed, atol=1e-5
    )
    all_skip = jnp.full((2, 2), depth.SKIP)
    skipped, aux = _forward(model, tokens, layer_decisions=all_skip)
    chex.assert_trees_all_close(skipped, model.logits(model.embed(tokens)), atol=1e-5)
    assert float(aux[0]["layer_skip_fraction"]) == 1.0
    repeated = _forward(model, tokens, layer_decisions=jnp.full((2, 2), depth.REPEAT))[0]
    assert not np.allclose(repeated, executed)
    _, eval_aux = _forward(model, tokens, train=False)  # a fresh router is uniform: argmax = skip
    total = sum(float(eval_aux[0][f"layer_{d}_fraction"]) for d in depth.LAYER_DECISIONS)
    assert total == pytest.approx(1.0)


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"router.name": "recurrent", "depth.mod_every": 1}, "model.depth.mod_every"),
        ({"depth.mod_every": 1, "depth.layer_router_dim": 4}, "model.depth.layer_router_dim"),
        ({"depth.mod_capacity": 0.0}, "model.depth.mod_capacity"),
        (
            {"moe.dispatch.name": "capacity", "moe.dispatch.options.schedule": "zigzag"},
            "model.moe.dispatch.options.schedule",
        ),
        ({"router.name": "similarity_aware", "router.options.mix": 2.0}, "options.mix"),
        ({"router.name": "top_p", "router.options.top_p": 0.0}, "model.router.options.top_p"),
    ],
)
def test_bad_conditional_compute_settings_are_rejected(changes, field):
    with pytest.raises(ConfigError, match=field):
        with_fields(SMALL, changes)
