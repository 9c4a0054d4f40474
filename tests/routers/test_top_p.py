"""The top-p router inside the MoE layer: its entropy loss (the paper's dynamic loss) reaches
the layer's auxiliary loss, weighted by `router_entropy_weight`."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.routers.losses import router_entropy_loss
from tests.routers.layer_helpers import hidden, make_layer


def _aux(entropy_weight: float, load_balance_weight: float = 0.01, router_z_weight: float = 1e-3):
    layer = make_layer(
        "top_p",
        router_entropy_weight=entropy_weight,
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
        layer = make_layer("top_p", router_entropy_weight=weight)
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


def test_entropy_weight_comes_from_the_model_config():
    import dataclasses

    from moejax.config import ModelConfig
    from moejax.models.moe_layer import MoEOptions

    config = dataclasses.replace(ModelConfig(), router="top_p", router_entropy_weight=0.25)
    assert MoEOptions.from_config(config).router_entropy_weight == 0.25
