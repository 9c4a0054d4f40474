"""Flux routers fitted on a frozen language model (`moejax.training.flux_fit`) and the
weight copy that puts a trained run into the routed model (`moejax.training.restore`)."""

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import config as config_lib
from moejax.models.transformer import TransformerLM
from moejax.sparse_attention import AttentionConfig
from moejax.sparse_attention.flux import router_param_filter
from moejax.training import flux_fit as ff
from moejax.training.restore import load_trained

ROOT = Path(__file__).resolve().parents[2]
SMALL = dataclasses.replace(
    config_lib.load_config_file(ROOT / "configs" / "tiny.py").model, num_layers=2
)
LOCAL = AttentionConfig.of("local", options={"window": 8}, block_size=8)
FLUX = dataclasses.replace(LOCAL, flux_router=True, flux_target_full_share=0.0)
BATCH, LENGTH = 8, 32


def trained_variables(attention: AttentionConfig | None = None, seed: int = 0) -> dict:
    """Pure-dict variables of a model standing in for a trained run."""
    model = TransformerLM(SMALL, attention=attention, rngs=nnx.Rngs(seed))
    return {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param)), "router_state": {}}


def flux_model(seed: int = 0) -> TransformerLM:
    model = TransformerLM(SMALL, attention=FLUX, rngs=nnx.Rngs(seed + 100))
    load_trained(model, trained_variables(seed=seed), fresh=router_param_filter)
    return model


def batch(seed: int = 1) -> dict:
    row = jax.random.randint(jax.random.key(seed), (BATCH, LENGTH + 1), 0, 256, jnp.int32)
    return {"inputs": row[:, :-1], "targets": row[:, 1:]}


def eval_logits(model, tokens):
    return nnx.jit(lambda m, t: m(t, train=False)[0])(model, tokens)


@pytest.mark.parametrize(("share", "attention"), [(1.0, None), (0.0, LOCAL)])
def test_fixed_gates_reproduce_the_model_with_that_attention(share, attention):
    """Always-full gates give the dense model the weights came from; always-sparse gates the
    same weights under the sparse kind alone."""
    model = flux_model()
    ff.set_fixed_gates(model, [share, share])
    reference = TransformerLM(SMALL, attention=attention, rngs=nnx.Rngs(7))
    load_trained(reference, trained_variables(), fresh=nnx.Nothing)
    tokens = batch()["inputs"]
    np.testing.assert_allclose(
        eval_logits(model, tokens), eval_logits(reference, tokens), rtol=2e-5, atol=2e-5
    )
    # The two references differ, so the check can tell full from sparse.
    other = TransformerLM(SMALL, attention=LOCAL if share else None, rngs=nnx.Rngs(7))
    load_trained(other, trained_variables(), fresh=nnx.Nothing)
    assert (
        float(jnp.max(jnp.abs(eval_logits(other, tokens) - eval_logits(reference, tokens)))) > 1e-3
    )


def test_fixed_gate_coin_has_its_share_and_is_the_same_for_the_same_sequence():
    gate = ff.FixedGate(0.3, salt=5)
    x = jax.random.normal(jax.random.key(0), (4000, 4, 3))
    logits = gate(x)
    assert abs(float(jnp.mean(logits > 0)) - 0.3) < 0.03
    np.testing.assert_array_equal(gate(x[:10]), logits[:10])
    assert not np.array_equal(ff.FixedGate(0.3, salt=6)(x), logits)
    with pytest.raises(ValueError, match="full_share=1.5"):
        ff.FixedGate(1.5, salt=0)


def test_restore_routers_puts_the_trained_routers_back():
    model = flux_model()
    tokens = batch()["inputs"]
    before = eval_logits(model, tokens)
    routers = ff.set_fixed_gates(model, [0.0, 0.0])
    ff.restore_routers(model, routers)
    np.testing.assert_array_equal(eval_logits(model, tokens), before)
    with pytest.raises(ValueError, match="full_shares: 3 values for 2"):
        ff.set_fixed_gates(model, [0.0, 0.0, 1.0])


def test_fitting_moves_only_the_routers_and_the_budget_moves_the_share():
    """Target share 0 with a heavy budget weight: the routers, which start preferring full
    attention, learn to pick sparse attention; nothing outside them changes."""
    model = flux_model()
    frozen = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(router_param_filter))))
    routers = nnx.to_pure_dict(nnx.state(model, router_param_filter))
    options = ff.FluxFitOptions(steps=30, learning_rate=3e-2, budget_weight=20.0)
    history = ff.fit_flux_routers(model, [batch(1), batch(2)], options)
    assert len(history) == 30
    assert history[0]["full_share"] > 0.5 and history[-1]["full_share"] < 0.5
    assert history[-1]["budget"] < history[0]["budget"]
    after = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(router_param_filter))))
    jax.tree.map(np.testing.assert_array_equal, after, frozen)
    moved = nnx.to_pure_dict(nnx.state(model, router_param_filter))
    pairs = zip(jax.tree.leaves(moved), jax.tree.leaves(routers), strict=True)
    assert any(not np.array_equal(a, b) for a, b in pairs)
    evaluated = ff.evaluate_gates(model, [batch(3)])
    assert evaluated["nll"].shape == (BATCH,)
    assert evaluated["full_share"].shape == (2,)


def test_models_without_flux_routers_and_bad_options_are_refused():
    with pytest.raises(ValueError, match="no Flux router"):
        ff.flux_layers(TransformerLM(SMALL, rngs=nnx.Rngs(0)))
    for field, value in (("steps", 0), ("learning_rate", 0.0), ("budget_weight", -1.0)):
        with pytest.raises(ValueError, match=f"{field}={value}"):
            ff.FluxFitOptions(**{field: value})
    with pytest.raises(ValueError, match="at least one training batch"):
        ff.fit_flux_routers(flux_model(), [], ff.FluxFitOptions(steps=1))


def test_load_trained_refuses_a_checkpoint_of_another_model():
    model = TransformerLM(SMALL, attention=FLUX, rngs=nnx.Rngs(0))
    wider = dataclasses.replace(SMALL, num_layers=3)
    variables = {
        "params": nnx.to_pure_dict(nnx.state(TransformerLM(wider, rngs=nnx.Rngs(0)), nnx.Param)),
        "router_state": {},
    }
    with pytest.raises(ValueError, match="do not match the model"):
        load_trained(model, variables, fresh=router_param_filter)
    # Without declaring the routers fresh, a plain run's checkpoint lacks them.
    with pytest.raises(ValueError, match="missing from the checkpoint"):
        load_trained(model, trained_variables(), fresh=nnx.Nothing)
