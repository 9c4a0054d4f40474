"""moejax's MoE layer inside models that are not moejax's: an NNX model of the test's own, a
plain-JAX training step through `nnx.split` / `nnx.merge` (a stateful router included), and a
Linen model through `flax.nnx.bridge`; each trains a few steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen, nnx

from moejax.models.moe_layer import MoELayer
from moejax.routers.base import RouterState

D_MODEL, D_FF, EXPERTS, TOP_K = 8, 16, 4, 2


def _regression_batch(seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """`x [4, 6, D_MODEL]` and a target that a small MoE model can fit."""
    x = jax.random.normal(jax.random.key(seed), (4, 6, D_MODEL))
    return x, jnp.tanh(x[..., ::-1])


class Regressor(nnx.Module):
    """A user's model: a projection, moejax's MoE layer, a read-out."""

    def __init__(self, router: str, *, rngs: nnx.Rngs):
        self.inp = nnx.Linear(D_MODEL, D_MODEL, rngs=rngs)
        self.moe = MoELayer(D_MODEL, D_FF, EXPERTS, TOP_K, router=router, rngs=rngs)
        self.out = nnx.Linear(D_MODEL, D_MODEL, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = self.inp(x)
        y, aux, _ = self.moe(h)
        return self.out(h + y), aux["aux_loss"]


def _loss(model: Regressor, x: jax.Array, target: jax.Array) -> jax.Array:
    y, aux_loss = model(x)
    return jnp.mean((y - target) ** 2) + aux_loss


def test_own_nnx_model_trains_with_the_moe_layer() -> None:
    model = Regressor("softmax_top_k", rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x, target = _regression_batch()

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(_loss)(model, x, target)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_plain_jax_step_carries_the_stateful_router_state() -> None:
    """`jax.grad` on a pure function of the split state, as the layer's docstring shows: the
    router state comes back as the loss's aux, updated by the layer's own rule."""
    model = Regressor("bias_balanced", rngs=nnx.Rngs(0))
    graphdef, params, router_state = nnx.split(model, nnx.Param, RouterState)
    x, target = _regression_batch()
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    def loss_fn(params, router_state):
        model = nnx.merge(graphdef, params, router_state, copy=True)
        return _loss(model, x, target), nnx.state(model, RouterState)

    @jax.jit
    def step(params, router_state, opt_state):
        (loss, router_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, router_state
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), router_state, opt_state, loss

    # The layer's own update: the same model called on the same batch, its state carried by NNX.
    own = nnx.merge(graphdef, params, router_state, copy=True)
    nnx.jit(_loss)(own, x, target)
    params, new_state, opt_state, first_loss = step(params, router_state, opt_state)
    np.testing.assert_allclose(
        new_state["moe"]["router_state"][...], own.moe.router_state[...], rtol=1e-6
    )
    assert not np.allclose(
        new_state["moe"]["router_state"][...], router_state["moe"]["router_state"][...]
    )
    for _ in range(6):
        params, new_state, opt_state, loss = step(params, new_state, opt_state)
    assert float(loss) < 0.8 * float(first_loss)


class LinenRegressor(linen.Module):
    """A Linen model with moejax's MoE layer bridged in."""

    @linen.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = linen.Dense(D_MODEL)(x)
        moe = nnx.bridge.ToLinen(MoELayer, args=(D_MODEL, D_FF, EXPERTS, TOP_K))
        y, aux, _ = moe(h)
        return linen.Dense(D_MODEL)(h + y), aux["aux_loss"]


def test_linen_model_trains_with_the_bridged_moe_layer() -> None:
    model = LinenRegressor()
    x, target = _regression_batch()
    params = linen.unbox(model.init(jax.random.key(0), x)["params"])
    assert params["ToLinen_0"]["w_gate"].shape == (EXPERTS, D_MODEL, D_FF)
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)

    def loss_fn(params):
        y, aux_loss = model.apply({"params": params}, x)
        return jnp.mean((y - target) ** 2) + aux_loss

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for _ in range(8):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses


def test_outside_code_reads_the_layers_routing_and_expert_weights() -> None:
    """`route` and `expert_params` are what the layer's call runs with: the same routing (top-1
    experts in the aux dict) and the same output from `moe_ffn` with the layer's dispatch."""
    from moejax import moe

    layer = MoELayer(D_MODEL, D_FF, EXPERTS, TOP_K, rngs=nnx.Rngs(0))
    x, _ = _regression_batch(1)
    y, aux, _ = layer(x)
    routing = layer.route(x)
    np.testing.assert_array_equal(routing.expert_index[:, 0], aux["top1_expert"])
    params = layer.expert_params()
    assert params["w_gate"].shape == (EXPERTS, D_MODEL, D_FF)
    assert layer.shared_expert_params() is None
    tokens = x.reshape(-1, D_MODEL)
    out = moe.moe_ffn(tokens, routing, params, strategy=layer.dispatch.name)
    np.testing.assert_allclose(out.y.reshape(x.shape), y, rtol=1e-6, atol=1e-6)
