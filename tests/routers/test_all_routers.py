"""Every registered router at once: inside the MoE layer both dispatch strategies match a float64
per-expert loop on its routing, and every router that owns parameters keeps the contract."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.routers.base import ROUTERS
from moejax.routers.base import get as get_router_spec
from tests.moe.dispatch_helpers import ONE_DEVICE, run_moe
from tests.routers.routing_helpers import (
    D_MODEL,
    EXPERTS,
    hidden_states,
    jit_router,
    normal_logits,
)


def _loop_reference(x, expert_index, combine_weights, params) -> np.ndarray:
    """Each token through each of its experts in float64, weighted and summed."""
    x = np.asarray(x, np.float64)
    w = {name: np.asarray(value, np.float64) for name, value in params.items()}
    y = np.zeros_like(x)
    for t, (experts, weights) in enumerate(
        zip(np.asarray(expert_index), np.asarray(combine_weights, np.float64), strict=True)
    ):
        for e, weight in zip(experts, weights, strict=True):
            gate = x[t] @ w["w_gate"][e]
            hidden = gate / (1.0 + np.exp(-gate)) * (x[t] @ w["w_up"][e])
            y[t] += weight * (hidden @ w["w_down"][e])
    return y


LOGITS_ROUTERS = sorted(name for name, spec in ROUTERS.items() if "router_logits" in spec.needs)


@pytest.mark.parametrize("name", LOGITS_ROUTERS)
def test_every_router_matches_loop_reference_under_both_strategies(name: str) -> None:
    tokens, experts, top_k, d_model, d_ff = 12, 4, 2, 6, 5
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((tokens, d_model)), jnp.float32)
    params = {
        "w_gate": jnp.asarray(rng.standard_normal((experts, d_model, d_ff)) / 3, jnp.float32),
        "w_up": jnp.asarray(rng.standard_normal((experts, d_model, d_ff)) / 3, jnp.float32),
        "w_down": jnp.asarray(rng.standard_normal((experts, d_ff, d_model)) / 3, jnp.float32),
    }
    # Peaked rows (for top_p's single-expert tokens) next to flat ones.
    logits = normal_logits(tokens, experts, seed=2, scale=3.0)
    options = {"rng": jax.random.key(0)} if name in ("noisy_top_k", "selective_sinkhorn") else {}
    if name in ("hash_layer", "random_fixed"):
        options["token_ids"] = jnp.asarray(rng.integers(0, 256, tokens), jnp.int32)
    if name == "kmeans":
        options["hidden"] = x
        options["centroids"] = jnp.asarray(rng.standard_normal((experts, d_model)), jnp.float32)
    if name == "similarity_aware":
        options["seq_len"] = 4
    if name == "attention_aware":
        scores = jnp.asarray(rng.standard_normal((3, 4, 4)), jnp.float32)
        options["attention_probs"] = jax.nn.softmax(scores, axis=-1)
    if name == "bias_balanced":
        options["expert_bias"] = jnp.asarray(rng.standard_normal(experts), jnp.float32)
    static = ("top_k", "seq_len") if name == "similarity_aware" else ("top_k",)
    routed = jit_router(get_router_spec(name).route, *static)(logits, top_k=top_k, **options)
    chex.assert_shape([routed.expert_index, routed.combine_weights], (tokens, top_k))
    chex.assert_type([routed.expert_index, routed.combine_weights], [jnp.int32, jnp.float32])
    assert {"load_balance", "router_z"} <= set(routed.aux_losses)
    expected = _loop_reference(x, routed.expert_index, routed.combine_weights, params)
    for strategy in ONE_DEVICE:
        # Factor num_experts gives each expert tokens * top_k slots: nothing is dropped.
        out = run_moe(x, routed, params, strategy=strategy, capacity_factor=float(experts))
        assert float(out.dropped_fraction) == 0.0
        np.testing.assert_allclose(out.y, expected, rtol=1e-5, atol=1e-6)


# The routers that read the hidden states through parameters of their own (token_table's
# parameters are a table over token ids: tests/routers/test_token_table.py).
LEARNED_ROUTERS = sorted(
    name
    for name, spec in ROUTERS.items()
    if spec.init_params is not None and "hidden" in spec.needs
)


# The recurrent router's state is narrower than its default, to keep the test small.
OPTIONS = {"recurrent": {"state_dim": 32}}


def _init(name: str, key: jax.Array) -> dict:
    """A layer's parameters, plus those the layers share (the recurrent router's GRU cell)."""
    spec = ROUTERS[name]
    options = spec.options(**OPTIONS.get(name, {}))
    params = spec.init_params(key, D_MODEL, EXPERTS, options)
    if spec.init_shared_params is not None:
        params |= spec.init_shared_params(jax.random.fold_in(key, 1), options)
    return params


def _route(name: str, hidden: jax.Array, params: dict, top_k: int):
    """Any learned router's Routing; the recurrent one starts from a zero state."""
    route = ROUTERS[name].route
    if name == "recurrent":
        return route(hidden, params, None, top_k=top_k)[0]
    return route(hidden, params, top_k=top_k)


@pytest.mark.parametrize("name", LEARNED_ROUTERS)
def test_params_match_declared_axes(name):
    params = _init(name, jax.random.key(0))
    assert set(params) == set(ROUTERS[name].param_axes)
    for key, value in params.items():
        assert value.ndim == len(ROUTERS[name].param_axes[key]), key
        assert value.dtype == jnp.float32, key
    # The only parameter with a d_model dimension is the one named "embed", and it is first.
    embed_params = [k for k, axes in ROUTERS[name].param_axes.items() if "embed" in axes]
    assert len(embed_params) == 1
    assert params[embed_params[0]].shape[0] == D_MODEL


@pytest.mark.parametrize("name", LEARNED_ROUTERS)
def test_routing_contract(name):
    params = _init(name, jax.random.key(1))
    top_k = 3
    result = jax.jit(lambda h, p: _route(name, h, p, top_k))(
        hidden_states(24).astype(jnp.bfloat16), params
    )
    chex.assert_shape(result.expert_index, (24, top_k))
    chex.assert_shape(result.combine_weights, (24, top_k))
    chex.assert_shape(result.router_probs, (24, EXPERTS))
    chex.assert_type(result.expert_index, jnp.int32)
    chex.assert_type([result.combine_weights, result.router_probs], jnp.float32)
    assert {"load_balance", "router_z"} <= set(result.aux_losses)
    for value in result.aux_losses.values():
        chex.assert_shape(value, ())
        assert np.isfinite(float(value))
    index = np.asarray(result.expert_index)
    assert ((index >= 0) & (index < EXPERTS)).all()
    # A token's slots name distinct experts.
    assert all(len(set(row)) == top_k for row in index)


@pytest.mark.parametrize("name", LEARNED_ROUTERS)
def test_bad_top_k_names_the_field(name):
    params = _init(name, jax.random.key(0))
    with pytest.raises(ValueError, match="top_k: got 7"):
        _route(name, hidden_states(4), params, top_k=EXPERTS + 1)
    with pytest.raises(ValueError, match="hidden: got"):
        _route(name, hidden_states(4, d_model=D_MODEL + 1), params, top_k=1)
