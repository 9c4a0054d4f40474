"""The token-table router: each token's experts are the top-k of its id's table row, whatever
the hidden states; its gates are the softmax of the chosen logits or 1 each."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.config import ConfigError, RouterConfig
from moejax.models.moe_layer import RouterContext
from moejax.routers.base import get
from moejax.routers.token_table import TokenTableOptions, token_table
from tests.routers.layer_helpers import hidden, make_layer

VOCAB, EXPERTS = 10, 5


def _table(seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    return {"table": jnp.asarray(rng.standard_normal((VOCAB, EXPERTS)), jnp.float32)}


def test_experts_are_the_top_k_of_the_tokens_table_row():
    params, ids = _table(), jnp.array([3, 0, 3, 9, 7], jnp.int32)
    routing = jax.jit(lambda p, t: token_table(p, top_k=2, token_ids=t))(params, ids)
    rows = np.asarray(params["table"])[np.asarray(ids)]  # [tokens, experts]
    expected = np.argsort(-rows, axis=1, kind="stable")[:, :2]
    np.testing.assert_array_equal(routing.expert_index, expected)
    chosen = np.take_along_axis(rows, expected, axis=1)
    np.testing.assert_allclose(routing.combine_weights, jax.nn.softmax(chosen), rtol=1e-6)
    np.testing.assert_allclose(routing.router_probs, jax.nn.softmax(rows), rtol=1e-6)
    chex.assert_type([routing.expert_index, routing.combine_weights], [jnp.int32, jnp.float32])
    assert {"load_balance", "router_z"} <= set(routing.aux_losses)
    assert all(np.isfinite(float(v)) for v in routing.aux_losses.values())
    # Ids outside the vocabulary wrap modulo vocab_size.
    wrapped = token_table(params, top_k=2, token_ids=jnp.array([13, -1]))
    np.testing.assert_array_equal(wrapped.expert_index, expected[[0, 3]])


def test_ones_gate_weighs_every_chosen_expert_one():
    """For MoE-fied experts (slices of one dense feed-forward): with every expert chosen the
    layer sums all of them, the dense output."""
    routing = token_table(_table(), top_k=EXPERTS, token_ids=jnp.arange(4), gate="ones")
    np.testing.assert_array_equal(routing.combine_weights, np.ones((4, EXPERTS)))
    assert all(sorted(row) == list(range(EXPERTS)) for row in np.asarray(routing.expert_index))


def test_layer_routes_by_token_id_alone_and_owns_only_the_table():
    options = {"vocab_size": VOCAB, "gate": "ones"}
    layer = make_layer("token_table", options=options)
    assert not hasattr(layer, "router")
    table = layer.router_params["table"][...]
    chex.assert_shape(table, (VOCAB, 4))
    ids = jnp.array([[1, 2, 3], [3, 2, 1]], jnp.int32)
    first = layer.route(hidden(batch=2, length=3, seed=1), RouterContext(token_ids=ids))
    second = layer.route(hidden(batch=2, length=3, seed=2), RouterContext(token_ids=ids))
    np.testing.assert_array_equal(first.expert_index, second.expert_index)
    expected = np.argsort(-np.asarray(table)[np.asarray(ids).reshape(-1)], axis=1)[:, :2]
    np.testing.assert_array_equal(first.expert_index, expected)
    with pytest.raises(ValueError, match=r"context.token_ids: got None"):
        layer(hidden(batch=2, length=3))


def test_params_are_a_table_over_the_vocabulary():
    spec = get("token_table")
    options = TokenTableOptions(vocab_size=VOCAB)
    params = spec.init_params(jax.random.key(0), 8, EXPERTS, options)
    assert set(params) == set(spec.param_axes) == {"table"}
    chex.assert_shape(params["table"], (VOCAB, EXPERTS))
    assert float(jnp.std(params["table"])) < 0.05  # near uniform, as the other routers start


def test_bad_arguments_name_the_field():
    params = _table()
    with pytest.raises(ValueError, match=r"top_k: got 6"):
        token_table(params, top_k=EXPERTS + 1, token_ids=jnp.arange(3))
    with pytest.raises(ValueError, match=r"token_ids: got None"):
        token_table(params, top_k=1)
    with pytest.raises(ValueError, match=r"gate: got 'uniform'; allowed: softmax, ones"):
        token_table(params, top_k=1, token_ids=jnp.arange(3), gate="uniform")
    with pytest.raises(ConfigError, match=r"model.router.options.vocab_size: got 0"):
        RouterConfig.of("token_table", vocab_size=0)
    with pytest.raises(ConfigError, match=r"model.router.options.gate: got 'sum'"):
        RouterConfig.of("token_table", gate="sum")
