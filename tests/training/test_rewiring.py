"""Rewiring Experts on the Fly: router-logit offsets fitted at test time on the text itself."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from small_lm import small_lm

from moejax.config import ModelConfig, MoEConfig, RouterConfig
from moejax.generation import generate
from moejax.models.moe_layer import RouterLogitOffset
from moejax.models.transformer import TransformerLM
from moejax.rewiring import (
    attach_logit_offsets,
    attached_layers,
    detach_logit_offsets,
    fit_logit_offsets,
    generate_rewired,
    logit_offsets,
    next_token_nll,
)
from moejax.routers.base import RouterState

# top_k=2: with one renormalized expert per token the combine weight is 1 whatever the logits,
# so the next-token loss would give the offsets no gradient.
CONFIG = small_lm(MoEConfig(every=1, num_experts=4, top_k=2, expert_d_ff=16))
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 16)).astype(np.int32)


def _model(seed: int = 0, config: ModelConfig = CONFIG) -> TransformerLM:
    return TransformerLM(config, rngs=nnx.Rngs(seed))


@nnx.jit
def _logits(model, tokens):
    return model(tokens, train=False)[0]


def _numpy_state(model, kind) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, kind)))


def _assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_zero_offsets_reproduce_logits_exactly():
    model = _model()
    plain = np.asarray(_logits(model, TOKENS))
    assert attach_logit_offsets(model) == [0, 1]
    np.testing.assert_array_equal(np.asarray(_logits(model, TOKENS)), plain)


def test_offset_is_added_to_the_router_logits():
    """The routing equals the router's on hidden @ router + offset."""
    model = _model()
    layer = model.blocks[0].ffn
    x = jax.random.normal(jax.random.key(1), (2, 16, 32))
    attach_logit_offsets(model, [0])
    offset = jnp.array([0.5, -1.0, 2.0, 0.0], jnp.float32)
    layer.logit_offset[...] = offset
    logits = x.reshape(-1, 32) @ layer.router[...] + offset
    routing = layer.route(x, train=False)
    np.testing.assert_allclose(routing.router_probs, jax.nn.softmax(logits), rtol=1e-5, atol=1e-6)


def test_offset_on_one_expert_draws_tokens_to_it():
    model = _model()
    layer = model.blocks[1].ffn
    x = jax.random.normal(jax.random.key(2), (2, 16, 32))

    def share_of_expert_2() -> float:
        chosen = np.asarray(layer.route(x, train=False).expert_index)  # [tokens, top_k]
        return float(np.mean(np.any(chosen == 2, axis=1)))

    before = share_of_expert_2()
    attach_logit_offsets(model, [1])
    layer.logit_offset[...] = jnp.array([0.0, 0.0, 0.1, 0.0])
    nudged = share_of_expert_2()
    layer.logit_offset[...] = jnp.array([0.0, 0.0, 5.0, 0.0])
    assert before < nudged < 1.0 == share_of_expert_2()
    # Block 0 has no offset, so its routing is untouched.
    assert attached_layers(model) == [1]


def test_fitting_lowers_the_nll_and_moves_only_the_offsets():
    model = _model()
    params, router_state = _numpy_state(model, nnx.Param), _numpy_state(model, RouterState)
    history = fit_logit_offsets(model, TOKENS, steps=15, learning_rate=0.2)
    assert len(history) == 16
    assert history[-1] < history[0] - 1e-3, history
    np.testing.assert_allclose(float(next_token_nll(model, TOKENS)), history[-1], rtol=1e-5)
    _assert_trees_equal(_numpy_state(model, nnx.Param), params)
    _assert_trees_equal(_numpy_state(model, RouterState), router_state)
    offsets = logit_offsets(model)
    assert sorted(offsets) == [0, 1] and all(np.abs(o).max() > 0 for o in offsets.values())


def test_fitting_chosen_layers_leaves_other_offsets_alone():
    model = _model()
    attach_logit_offsets(model)
    fit_logit_offsets(model, TOKENS, steps=3, learning_rate=0.2, layers=[1])
    offsets = logit_offsets(model)
    np.testing.assert_array_equal(offsets[0], np.zeros(4, np.float32))
    assert np.abs(offsets[1]).max() > 0


def test_detach_restores_the_exact_original_model():
    model = _model()
    plain = np.asarray(_logits(model, TOKENS))
    graphdef = nnx.graphdef(model)
    fit_logit_offsets(model, TOKENS, steps=3, learning_rate=0.5)
    assert not np.array_equal(np.asarray(_logits(model, TOKENS)), plain)
    assert detach_logit_offsets(model) == [0, 1]
    assert nnx.graphdef(model) == graphdef
    assert not nnx.state(model, RouterLogitOffset)
    np.testing.assert_array_equal(np.asarray(_logits(model, TOKENS)), plain)


def test_offsets_stay_out_of_params_and_checkpoint_state():
    model, fresh = _model(), _model()
    attach_logit_offsets(model)
    model.blocks[0].ffn.logit_offset[...] = jnp.ones(4)
    _assert_trees_equal(_numpy_state(model, nnx.Param), _numpy_state(fresh, nnx.Param))
    _assert_trees_equal(_numpy_state(model, RouterState), _numpy_state(fresh, RouterState))
    offsets = nnx.to_pure_dict(nnx.state(model, RouterLogitOffset))
    assert sorted(offsets["blocks"]) == [0, 1]


PROMPT = [int(t) for t in TOKENS[1, :6]]


def test_rewired_generation_without_steps_is_greedy_generation():
    model = _model()
    plain = generate(model, [PROMPT], max_new_tokens=6).tokens[0]
    rewired = generate_rewired(
        model, PROMPT, max_new_tokens=6, refit_every=3, steps=0, learning_rate=0.1
    )
    assert rewired.tokens == plain
    # Fitted at prefill on the prompt, then after 3 generated tokens on the text so far.
    assert [r.length for r in rewired.refits] == [6, 9]
    for refit in rewired.refits:
        text = jnp.asarray([(PROMPT + plain)[: refit.length]])
        np.testing.assert_allclose(refit.nll, [float(next_token_nll(model, text))], rtol=1e-5)
    assert attached_layers(model) == []


def test_rewired_generation_refits_and_decodes_with_the_new_offsets():
    """The last chunk is the greedy continuation of the text so far under the final offsets."""
    model = _model()
    rewired = generate_rewired(
        model, PROMPT, max_new_tokens=6, refit_every=3, steps=3, learning_rate=0.5
    )
    assert [r.length for r in rewired.refits] == [6, 9]
    assert sorted(rewired.offsets) == [0, 1] and attached_layers(model) == []
    attach_logit_offsets(model)
    for layer, offset in rewired.offsets.items():
        model.blocks[layer].ffn.logit_offset[...] = offset
    text = PROMPT + rewired.tokens[:3]
    assert generate(model, [text], max_new_tokens=3).tokens[0] == rewired.tokens[3:]


COSINE = dataclasses.replace(CONFIG, router=RouterConfig(name="cosine"))


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda m: attach_logit_offsets(m, [2]), "attach_logit_offsets layers"),
        (lambda m: attach_logit_offsets(m, [0, 0]), "attach_logit_offsets layers"),
        (lambda m: fit_logit_offsets(m, TOKENS, steps=-1, learning_rate=0.1), "steps"),
        (lambda m: fit_logit_offsets(m, TOKENS, steps=1, learning_rate=0.0), "learning_rate"),
        (lambda m: fit_logit_offsets(m, TOKENS[0], steps=1, learning_rate=0.1), "tokens"),
        (
            lambda m: generate_rewired(
                m, [1, 2], max_new_tokens=4, refit_every=0, steps=1, learning_rate=0.1
            ),
            "generate_rewired refit_every",
        ),
        (
            lambda m: generate_rewired(
                m, [1, 2], max_new_tokens=31, refit_every=2, steps=1, learning_rate=0.1
            ),
            "generate_rewired max_new_tokens",
        ),
        (
            lambda m: generate_rewired(
                m, [1], max_new_tokens=2, refit_every=2, steps=1, learning_rate=0.1
            ),
            "generate_rewired prompt",
        ),
    ],
)
def test_bad_arguments_name_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call(_model())


def test_generate_rewired_refuses_a_model_that_already_has_offsets():
    model = _model()
    attach_logit_offsets(model, [1])
    with pytest.raises(ValueError, match="generate_rewired model"):
        generate_rewired(model, [1, 2], max_new_tokens=2, refit_every=1, steps=0, learning_rate=1)
    assert attached_layers(model) == [1]


def test_routers_without_router_logits_are_refused_by_name():
    model = _model(config=COSINE)
    with pytest.raises(ValueError, match="router 'cosine'"):
        attach_logit_offsets(model)
    assert attached_layers(model) == []
