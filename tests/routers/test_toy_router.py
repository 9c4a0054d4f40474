"""Adding a router takes one spec and one `register` call: a toy router defined in this module,
selected by name through the config, trains the language model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import apply_overrides, load_config_file
from moejax.parallel import sharding
from moejax.routers.base import ROUTERS, RouterSpec, register
from moejax.routers.softmax_top_k import softmax_top_k
from moejax.training import state as state_lib
from moejax.training.step import global_batch, make_train_step
from tests.routers.layer_helpers import CONFIGS


def token_parity_top_k(router_logits: jax.Array, *, top_k: int, token_ids: jax.Array):
    """Softmax top-k after a bonus of 1 for the expert `token_id % num_experts`."""
    num_experts = router_logits.shape[-1]
    bonus = jax.nn.one_hot(token_ids % num_experts, num_experts)  # [tokens, experts]
    return softmax_top_k(router_logits + bonus, top_k=top_k)


TOY = RouterSpec("token_parity", token_parity_top_k, needs=("router_logits", "token_ids"))


@pytest.fixture
def toy_router():
    # Registered for this test only, so other test modules see the built-in table.
    spec = register(TOY)
    yield spec.name
    del ROUTERS[spec.name]


def test_toy_router_selected_by_config_trains_the_language_model(toy_router):
    config = load_config_file(CONFIGS / "tiny.py")
    config = apply_overrides(config, [f"model.router.name={toy_router}"])
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, jax.devices()[:1])
    layout = state_lib.state_layout(config, mesh)
    state = state_lib.init_state(config, layout)
    router_before = _router_weights(state)
    step = make_train_step(layout, mesh)
    tokens = np.arange(8 * 33).reshape(8, 33).astype(np.int32) % 256
    batch = global_batch(mesh, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    losses = []
    for _ in range(3):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    router_after = _router_weights(state)
    assert (
        router_after
        and max(
            float(jnp.max(jnp.abs(a - b))) for a, b in zip(router_after, router_before, strict=True)
        )
        > 0.0
    )


def _router_weights(state) -> list[jax.Array]:
    """The MoE layers' linear router weights, the toy router's only parameters."""
    params = jax.device_get(state_lib.model_variables(state))
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return [np.asarray(leaf) for path, leaf in flat if "router" in jax.tree_util.keystr(path)]
