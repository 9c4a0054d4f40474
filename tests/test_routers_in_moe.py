"""Every registered router inside the MoE layer: both dispatch strategies match a float64
per-expert loop on its routing."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.moe import DISPATCH_STRATEGIES, moe_ffn
from moejax.routers.base import ROUTERS
from moejax.routing import get_router

jit_moe_ffn = jax.jit(moe_ffn, static_argnames=("strategy", "capacity_factor", "gmm_impl"))


def _jit(router, *static: str):
    """jit with the options that pick the program (shapes, loop lengths, branches) static."""
    return jax.jit(router, static_argnames=static)


def _logits(tokens: int, experts: int, seed: int = 0, scale: float = 2.0) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((tokens, experts)) * scale, jnp.float32)


# --- every router inside the MoE layer -----------------------------------------------------


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


# The routers that read the logits of the layer's linear router (the others own parameters).
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
    logits = _logits(tokens, experts, seed=2, scale=3.0)
    options = {"rng": jax.random.key(0)} if name in ("noisy_top_k", "selective_sinkhorn") else {}
    if name in ("hash", "random_fixed"):
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
    routed = _jit(get_router(name), *static)(logits, top_k=top_k, **options)
    chex.assert_shape([routed.expert_index, routed.combine_weights], (tokens, top_k))
    chex.assert_type([routed.expert_index, routed.combine_weights], [jnp.int32, jnp.float32])
    assert {"load_balance", "router_z"} <= set(routed.aux_losses)
    expected = _loop_reference(x, routed.expert_index, routed.combine_weights, params)
    for strategy in DISPATCH_STRATEGIES:
        # Factor num_experts gives each expert tokens * top_k slots: nothing is dropped.
        out = jit_moe_ffn(x, routed, params, strategy=strategy, capacity_factor=float(experts))
        assert float(out.dropped_fraction) == 0.0
        np.testing.assert_allclose(out.y, expected, rtol=1e-5, atol=1e-6)
