"""The top-p router: each token takes the fewest experts whose probability reaches p (at most
top_k); inside the MoE layer its entropy loss (the paper's dynamic loss) reaches the layer's
auxiliary loss, weighted by `model.router.options.entropy_weight`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.config import Config, apply_overrides, with_fields
from moejax.models.transformer import TransformerLM
from moejax.routers.losses import router_entropy_loss
from moejax.routers.top_p import active_experts, top_p_router
from tests.routers.layer_helpers import hidden, make_layer
from tests.routers.routing_helpers import jit_router, normal_logits


def _aux(entropy_weight: float, load_balance_weight: float = 0.01, router_z_weight: float = 1e-3):
    layer = make_layer(
        "top_p",
        options={"entropy_weight": entropy_weight},
        load_balance_weight=load_balance_weight,
        router_z_weight=router_z_weight,
    )
    _, aux, _ = layer(hidden(), train=True)
    return layer, aux


def test_aux_loss_is_the_weighted_sum_of_the_declared_losses_entropy_included():
    weight = 0.5
    layer, aux = _aux(weight)
    tokens = hidden().reshape(-1, hidden().shape[-1])
    probs = jax.nn.softmax(tokens @ layer.router[...], axis=-1)  # [tokens, experts]
    np.testing.assert_allclose(aux["router_entropy_loss"], router_entropy_loss(probs), rtol=1e-5)
    expected = (
        0.01 * aux["load_balance_loss"]
        + 1e-3 * aux["router_z_loss"]
        + weight * aux["router_entropy_loss"]
    )
    np.testing.assert_allclose(aux["aux_loss"], expected, rtol=1e-6)


def test_entropy_weight_changes_the_loss_and_its_gradient():
    def loss_and_grad(weight: float):
        layer = make_layer("top_p", options={"entropy_weight": weight})
        graphdef, params = nnx.split(layer, nnx.Param)

        def loss(params):
            _, aux, _ = nnx.merge(graphdef, params)(hidden(), train=True)
            return aux["aux_loss"]

        value, grads = jax.value_and_grad(loss)(params)
        return value, grads["router"][...]

    value_0, grad_0 = loss_and_grad(0.0)
    value_1, grad_1 = loss_and_grad(1.0)
    _, aux = _aux(1.0)
    np.testing.assert_allclose(value_1 - value_0, aux["router_entropy_loss"], rtol=1e-5)
    assert float(jnp.max(jnp.abs(grad_1 - grad_0))) > 1e-6


def test_layer_routes_with_its_configured_options():
    """The threshold and renormalisation set in the router's options reach the route."""

    def routing(**options):
        layer = make_layer("top_p", options=options)
        _, aux, _ = layer(hidden(), train=True)
        tokens = hidden().reshape(-1, hidden().shape[-1])
        logits = tokens @ layer.router[...]  # [tokens, experts]
        return aux, top_p_router(logits, top_k=layer.top_k, **options)

    for options in ({"top_p": 0.05}, {"top_p": 1.0}, {"top_p": 1.0, "renormalize": False}):
        aux, expected = routing(**options)
        np.testing.assert_array_equal(aux["top1_expert"], expected.expert_index[:, 0])
        np.testing.assert_allclose(
            aux["load_balance_loss"], expected.aux_losses["load_balance"], rtol=1e-6
        )
    one, _ = routing(top_p=0.05)
    two, _ = routing(top_p=1.0)
    assert float(one["load_balance_loss"]) != pytest.approx(float(two["load_balance_loss"]))
    # Raw probabilities as weights scale the output down: renormalize reaches the route too.
    outputs = [
        make_layer("top_p", options={"top_p": 1.0, "renormalize": renormalize})(hidden())[0]
        for renormalize in (True, False)
    ]
    assert float(jnp.max(jnp.abs(outputs[0] - outputs[1]))) > 1e-4


def test_entropy_weight_comes_from_the_config():
    config = apply_overrides(
        Config(), ["model.router.name=top_p", "model.router.options.entropy_weight=0.25"]
    )
    model = TransformerLM(with_fields(config.model, {"num_layers": 1}), rngs=nnx.Rngs(0))
    assert model.blocks[0].ffn.router_config.loss_weight("entropy_weight") == 0.25


@settings(max_examples=15, deadline=None)
@given(
    experts=st.integers(1, 8),
    top_p=st.sampled_from([0.2, 0.4, 0.5, 0.8, 1.0]),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_top_p_activates_the_fewest_experts_reaching_p(
    experts: int, top_p: float, seed: int, data: st.DataObject
) -> None:
    top_k = data.draw(st.integers(1, experts))
    logits = normal_logits(16, experts, seed=seed)
    routed = jit_router(top_p_router, "top_k", "top_p")(logits, top_k=top_k, top_p=top_p)
    logits64 = np.asarray(logits, np.float64)
    probs = np.exp(logits64 - logits64.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    cumulative = np.cumsum(-np.sort(-probs, axis=-1), axis=-1)
    # Fewest experts whose probability reaches p, at most top_k.
    expected = np.minimum(np.argmax(cumulative >= top_p - 1e-12, axis=-1) + 1, top_k)
    np.testing.assert_array_equal(active_experts(routed), expected)
    # Active slots are the most probable experts with weights proportional to probabilities.
    weights = np.asarray(routed.combine_weights)
    chosen = np.take_along_axis(probs, np.asarray(routed.expert_index), axis=-1)
    active = np.arange(top_k) < expected[:, None]
    np.testing.assert_array_equal(weights == 0, ~active)
    renormalized = np.where(active, chosen, 0) / np.sum(np.where(active, chosen, 0), -1)[:, None]
    np.testing.assert_allclose(weights, renormalized, rtol=1e-5, atol=1e-7)


def test_top_p_uses_one_expert_when_peaked_and_top_k_when_flat() -> None:
    peaked = jnp.zeros((4, 8)).at[:, 5].set(5.0)
    flat = jnp.zeros((4, 8))
    np.testing.assert_array_equal(active_experts(top_p_router(peaked, top_k=3)), 1)
    np.testing.assert_array_equal(active_experts(top_p_router(flat, top_k=3)), 3)
    raw = top_p_router(peaked, top_k=3, renormalize=False)
    np.testing.assert_allclose(raw.combine_weights[:, 0], jax.nn.softmax(peaked)[:, 5])


def test_top_p_aux_losses_count_active_assignments_and_entropy() -> None:
    logits = normal_logits(32, 6, seed=2)
    routed = top_p_router(logits, top_k=3, top_p=0.5)
    probs = np.asarray(routed.router_probs, np.float64)
    entropy = -np.sum(probs * np.log(probs), axis=-1).mean()
    np.testing.assert_allclose(routed.aux_losses["router_entropy"], entropy, rtol=1e-5)
    index, active = np.asarray(routed.expert_index), np.asarray(routed.combine_weights) != 0
    counts = np.bincount(index[active], minlength=6)
    expected = 6 * np.sum(counts / counts.sum() * probs.mean(axis=0))
    np.testing.assert_allclose(routed.aux_losses["load_balance"], expected, rtol=1e-5)


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.5])
def test_top_p_rejects_thresholds_outside_zero_one(top_p: float) -> None:
    with pytest.raises(ValueError, match=rf"top_p: got {top_p}; allowed: in \(0, 1\]"):
        top_p_router(normal_logits(4, 4), top_k=2, top_p=top_p)
