"""The auxiliary losses of routers/losses.py: the Switch load-balancing loss and the z-loss.

The load-balancing loss on its own: value and gradient against the formula.
`loss = E * sum_e f_e * P_e` with `f_e` the share of the tokens * top_k assignments sent to
expert e (no gradient: a discrete choice) and `P_e = mean_t probs[t, e]`, so
`d loss / d probs[t, e] = E * f_e / T` exactly. Checked without the z-loss, whose gradient alone
would hide a balancing loss that carries none.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.routers.losses import active_load_balance_loss, load_balance_loss, router_z_loss
from moejax.routers.softmax_top_k import softmax_top_k
from tests.routers.routing_helpers import key_logits


def _assignment_fraction(expert_index: np.ndarray, num_experts: int) -> np.ndarray:
    counts = np.zeros(num_experts)
    for expert in np.asarray(expert_index).reshape(-1):
        counts[expert] += 1
    return counts / np.asarray(expert_index).size


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balance_loss_value_and_gradient_match_the_switch_formula(top_k: int) -> None:
    tokens, experts = 12, 5
    probs = jax.nn.softmax(key_logits(tokens, experts))
    expert_index = jax.lax.top_k(probs, top_k)[1]
    fraction = _assignment_fraction(expert_index, experts)  # [experts]
    p = np.asarray(probs, np.float64)
    np.testing.assert_allclose(
        load_balance_loss(probs, expert_index),
        experts * np.sum(fraction * p.mean(axis=0)),
        rtol=1e-6,
    )
    grad = jax.grad(load_balance_loss)(probs, expert_index)  # [tokens, experts]
    want = np.broadcast_to(experts * fraction / tokens, (tokens, experts))
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-9)


def test_load_balance_gradient_through_the_router_logits_is_the_softmax_chain_rule() -> None:
    tokens, experts, top_k = 10, 4, 2
    logits = key_logits(tokens, experts, seed=1)
    routing = softmax_top_k(logits, top_k=top_k)
    fraction = _assignment_fraction(routing.expert_index, experts)

    def balance_only(x: jax.Array) -> jax.Array:
        return softmax_top_k(x, top_k=top_k).aux_losses["load_balance"]

    grad = np.asarray(jax.grad(balance_only)(logits), np.float64)
    # d/dz_tj of sum_e c_e p_te = p_tj (c_j - sum_e c_e p_te), with c_e = E f_e / T.
    p = np.asarray(routing.router_probs, np.float64)
    c = experts * fraction / tokens
    want = p * (c[None, :] - (p @ c)[:, None])
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-8)
    assert np.abs(grad).max() > 1e-3


def test_active_load_balance_gradient_counts_only_active_slots() -> None:
    tokens, experts = 6, 4
    probs = jax.nn.softmax(key_logits(tokens, experts, seed=2))
    expert_index = jnp.array([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
    combine_weights = jnp.array([[0.6, 0.4], [1.0, 0.0], [0.5, 0.5], [1.0, 0.0], [0.7, 0.3],
                                 [0.2, 0.8]])  # fmt: skip
    active = np.asarray(combine_weights) != 0
    counts = np.zeros(experts)
    for t in range(tokens):
        for slot in range(2):
            if active[t, slot]:
                counts[int(expert_index[t, slot])] += 1
    fraction = counts / active.sum()
    grad = jax.grad(active_load_balance_loss)(probs, combine_weights, expert_index)
    want = np.broadcast_to(experts * fraction / tokens, (tokens, experts))
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-9)


def test_load_balance_loss_is_one_for_uniform_routing() -> None:
    num_experts = 4
    # Token t picks experts t and t+1 (mod 4): every expert gets the same share of assignments.
    tokens = jnp.arange(8)
    expert_index = jnp.stack([tokens % num_experts, (tokens + 1) % num_experts], axis=-1)
    router_probs = jnp.full((8, num_experts), 1.0 / num_experts)
    loss = load_balance_loss(router_probs, expert_index)
    np.testing.assert_allclose(loss, 1.0, rtol=1e-6)
    # Uniform logits through the router itself: top_k breaks ties, but probabilities are uniform.
    routing = softmax_top_k(jnp.zeros((8, num_experts)), top_k=num_experts)
    np.testing.assert_allclose(routing.aux_losses["load_balance"], 1.0, rtol=1e-6)


def test_load_balance_loss_is_num_experts_when_routing_collapses() -> None:
    num_experts = 5
    logits = jnp.zeros((10, num_experts)).at[:, 2].set(1e4)
    routing = softmax_top_k(logits, top_k=1)
    np.testing.assert_array_equal(routing.expert_index, 2)
    np.testing.assert_allclose(routing.aux_losses["load_balance"], num_experts, rtol=1e-6)


def test_load_balance_loss_exceeds_one_for_skewed_routing() -> None:
    logits = key_logits(64, 4).at[:, 0].add(2.0)
    assert softmax_top_k(logits, top_k=2).aux_losses["load_balance"] > 1.0


def test_router_z_loss_is_mean_squared_logsumexp() -> None:
    logits = np.asarray(key_logits(9, 6, seed=3))
    log_z = np.log(np.sum(np.exp(logits.astype(np.float64)), axis=-1))
    np.testing.assert_allclose(router_z_loss(jnp.asarray(logits)), np.mean(log_z**2), rtol=1e-6)
    routing = softmax_top_k(jnp.asarray(logits), top_k=2)
    np.testing.assert_allclose(routing.aux_losses["router_z"], np.mean(log_z**2), rtol=1e-6)


def test_aux_losses_are_differentiable_through_router_probs() -> None:
    def total_aux(logits: jax.Array) -> jax.Array:
        losses = softmax_top_k(logits, top_k=2).aux_losses
        return losses["load_balance"] + losses["router_z"]

    grad = jax.grad(total_aux)(key_logits(8, 4))
    assert bool(jnp.all(jnp.isfinite(grad))) and bool(jnp.any(grad != 0))
