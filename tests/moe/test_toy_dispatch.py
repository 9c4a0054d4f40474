"""Adding a dispatch strategy takes one spec and one `register` call: a toy strategy defined in
this module, selected by name through the config with its own options, agrees with the built-in
ones and trains the language model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import moe
from moejax.config import ConfigError, apply_overrides, load_config_file
from moejax.moe import DispatchOptions, DispatchSpec
from moejax.parallel import sharding
from moejax.training import state as state_lib
from moejax.training.step import global_batch, make_train_step
from tests.moe.dispatch_helpers import loop_reference, problem, run_moe
from tests.routers.layer_helpers import CONFIGS


@dataclasses.dataclass(frozen=True)
class DenseOptions(DispatchOptions):
    """Options of the toy strategy.

    Attributes:
      precision: the einsums' `jax.lax.Precision` name ("default" or "highest").
    """

    precision: str = "default"


def dense_masked(x, routing, expert_params, *, precision: str):
    """Every expert on every token, then each token's chosen experts weighted: [tokens, experts]
    combine weights, zero where not chosen."""
    num_experts = expert_params["w_gate"].shape[0]
    one_hot = jax.nn.one_hot(routing.expert_index, num_experts, dtype=x.dtype)  # [t, k, e]
    weights = jnp.einsum("tke,tk->te", one_hot, routing.combine_weights.astype(x.dtype))
    einsum = lambda spec, a, b: jnp.einsum(spec, a, b, precision=precision)  # noqa: E731
    gate = einsum("td,edf->tef", x, expert_params["w_gate"].astype(x.dtype))
    up = einsum("td,edf->tef", x, expert_params["w_up"].astype(x.dtype))
    every = einsum("tef,efd->ted", jax.nn.silu(gate) * up, expert_params["w_down"].astype(x.dtype))
    return jnp.einsum("ted,te->td", every, weights), jnp.zeros((), jnp.float32)


TOY = DispatchSpec("dense_masked", dense_masked, DenseOptions, expert_shards="any")


@pytest.fixture
def toy_dispatch():
    # Registered for this test only, so other test modules see the built-in table.
    spec = moe.register(TOY)
    yield spec.name
    del moe.DISPATCHES[spec.name]


def test_toy_dispatch_agrees_with_the_built_in_strategies(toy_dispatch):
    x, routing, params = problem(12, 4, 2, 6, 5, seed=3)
    expected = loop_reference(x, routing.expert_index, routing.combine_weights, params)
    toy = run_moe(x, routing, params, strategy=toy_dispatch, precision="highest")
    dropless = run_moe(x, routing, params, strategy="dropless")
    np.testing.assert_allclose(toy.y, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(toy.y, dropless.y, rtol=1e-5, atol=1e-6)


def test_toy_dispatch_options_come_from_the_config(toy_dispatch):
    config = load_config_file(CONFIGS / "tiny.py")
    chosen = apply_overrides(
        config,
        [
            f"model.moe.dispatch.name={toy_dispatch}",
            "model.moe.dispatch.options.precision=highest",
        ],
    )
    assert chosen.model.moe.dispatch.options == DenseOptions(precision="highest")
    # Options of another strategy are not the toy's: the error lists the ones it has.
    with pytest.raises(ConfigError, match=r"allowed fields of .*\(DenseOptions\): precision"):
        apply_overrides(
            config,
            [
                f"model.moe.dispatch.name={toy_dispatch}",
                "model.moe.dispatch.options.gmm_impl=xla",
            ],
        )


def test_toy_dispatch_selected_by_config_trains_the_language_model(toy_dispatch):
    config = load_config_file(CONFIGS / "tiny.py")
    config = apply_overrides(config, [f"model.moe.dispatch.name={toy_dispatch}"])
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, jax.devices()[:1])
    layout = state_lib.state_layout(config, mesh)
    state = state_lib.init_state(config, layout)
    experts_before = _expert_weights(state)
    step = make_train_step(layout, mesh)
    tokens = np.arange(8 * 33).reshape(8, 33).astype(np.int32) % 256
    batch = global_batch(mesh, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    experts_after = _expert_weights(state)
    assert experts_after
    changes = [
        float(np.max(np.abs(a - b))) for a, b in zip(experts_after, experts_before, strict=True)
    ]
    assert min(changes) > 0.0, "every expert weight is trained through the toy dispatch"


def test_unregistered_toy_is_an_unknown_name():
    with pytest.raises(ValueError, match="dispatch: got 'dense_masked'; allowed: dropless"):
        moe.get("dense_masked")


def _expert_weights(state) -> list[np.ndarray]:
    """The MoE layers' routed expert weights."""
    params = jax.device_get(state_lib.model_variables(state))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    names = ("'w_gate'", "'w_up'", "'w_down'")
    return [
        np.asarray(leaf)
        for path, leaf in flat
        if any(name in jax.tree_util.keystr(path) for name in names)
        and "shared" not in jax.tree_util.keystr(path)
    ]
