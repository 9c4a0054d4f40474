"""The router families of `moejax.routers`: each one's defining property, and MoE integration."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.moe import moe_ffn
from moejax.routers import (
    active_experts,
    capacity_schedule,
    hash_router,
    noisy_top_k,
    sinkhorn_log_plan,
    sinkhorn_router,
    top_p_router,
)
from moejax.routers.base import ROUTERS
from moejax.routers.hashing import hash_expert_index
from moejax.routers.random_fixed import random_fixed
from moejax.routers.selective_sinkhorn import selective_sinkhorn
from moejax.routing import get_router, load_balance_loss, softmax_top_k

NEW_ROUTERS = ("noisy_top_k", "sinkhorn", "selective_sinkhorn", "hash", "random_fixed", "top_p")
jit_moe_ffn = jax.jit(moe_ffn, static_argnames=("strategy", "capacity_factor", "gmm_impl"))


def _jit(router, *static: str):
    """jit with the options that pick the program (shapes, loop lengths, branches) static."""
    return jax.jit(router, static_argnames=static)


def _logits(tokens: int, experts: int, seed: int = 0, scale: float = 2.0) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((tokens, experts)) * scale, jnp.float32)


def _assert_same_routing(a, b, exact: bool = True) -> None:
    np.testing.assert_array_equal(a.expert_index, b.expert_index)
    if exact:
        np.testing.assert_array_equal(a.combine_weights, b.combine_weights)
        np.testing.assert_array_equal(a.router_probs, b.router_probs)
    else:
        np.testing.assert_allclose(a.combine_weights, b.combine_weights, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(a.router_probs, b.router_probs, rtol=1e-6, atol=1e-7)


def test_new_routers_are_registered_after_softmax_top_k() -> None:
    assert list(ROUTERS)[0] == "softmax_top_k"
    assert set(NEW_ROUTERS) <= set(ROUTERS)
    with pytest.raises(ValueError, match=r"allowed: softmax_top_k, .*top_p"):
        get_router("nope")


# --- noisy top-k ---------------------------------------------------------------------------


def test_noisy_top_k_without_noise_is_softmax_top_k() -> None:
    logits = _logits(16, 6)
    expected = softmax_top_k(logits, top_k=2)
    _assert_same_routing(noisy_top_k(logits, top_k=2), expected)
    # With a key but outside training there is no noise either.
    _assert_same_routing(noisy_top_k(logits, top_k=2, rng=jax.random.key(0), train=False), expected)
    np.testing.assert_array_equal(
        noisy_top_k(logits, top_k=2).aux_losses["router_z"], expected.aux_losses["router_z"]
    )


def test_noise_reorders_near_ties_reproducibly() -> None:
    # Logits within 1e-3 of each other: noise of std 1/num_experts decides most choices.
    logits = _logits(64, 4, scale=1e-3)
    clean = softmax_top_k(logits, top_k=1).expert_index
    noisy = _jit(noisy_top_k, "top_k")
    first = noisy(logits, top_k=1, rng=jax.random.key(1))
    again = noisy(logits, top_k=1, rng=jax.random.key(1))
    other = noisy(logits, top_k=1, rng=jax.random.key(2))
    np.testing.assert_array_equal(first.expert_index, again.expert_index)
    assert np.mean(np.asarray(first.expert_index != clean)) > 0.3
    assert np.mean(np.asarray(first.expert_index != other.expert_index)) > 0.3
    # Clearly separated logits (gaps of 10 standard deviations) are left in order.
    separated = jnp.tile(jnp.arange(4.0) * 2.5, (64, 1))
    np.testing.assert_array_equal(noisy(separated, top_k=1, rng=jax.random.key(1)).expert_index, 3)


def test_learned_noise_scale_is_softplus_of_noise_logits() -> None:
    logits = _logits(64, 4, scale=1e-3)
    clean = softmax_top_k(logits, top_k=1)
    key = jax.random.key(3)
    # softplus(-100) is ~4e-44: no noise whatever noise_std says.
    quiet = noisy_top_k(logits, top_k=1, rng=key, noise_std=5.0, noise_logits=logits - 100.0)
    np.testing.assert_array_equal(quiet.expert_index, clean.expert_index)
    # The noisy logits are logits + softplus(noise_logits) * N(0, 1) with the key's normals.
    noise_logits = _logits(64, 4, seed=5)
    routed = noisy_top_k(logits, top_k=4, rng=key, noise_logits=noise_logits)
    noisy = logits + jax.nn.softplus(noise_logits) * jax.random.normal(key, logits.shape)
    np.testing.assert_allclose(routed.router_probs, jax.nn.softmax(noisy), rtol=1e-5)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"noise_std": -1.0}, r"noise_std: got -1.0; allowed: finite and >= 0"),
        ({"noise_logits": jnp.zeros((3, 4))}, r"noise_logits.shape: got \(3, 4\)"),
    ],
)
def test_noisy_top_k_rejects_bad_options(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        noisy_top_k(_logits(4, 4), top_k=1, rng=jax.random.key(0), **options)


# --- Sinkhorn ------------------------------------------------------------------------------


def _sinkhorn_reference(logits: np.ndarray, top_k: int, num_iters: int, tolerance: float):
    """The same log-space iterations and stopping rule in float64 numpy; returns the plan."""
    logits = np.asarray(logits, np.float64)
    tokens, experts = logits.shape

    def logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
        peak = a.max(axis=axis, keepdims=True)
        return (peak + np.log(np.exp(a - peak).sum(axis=axis, keepdims=True))).squeeze(axis)

    row, column = np.zeros(tokens), np.zeros(experts)
    for i in range(num_iters):
        new_row = np.log(top_k) - logsumexp(logits + column, axis=1)
        if i > 0 and np.max(np.abs(new_row - row)) < tolerance:
            break
        row = new_row
        column = np.log(tokens * top_k / experts) - logsumexp(logits + row[:, None], axis=0)
    return np.exp(logits + row[:, None] + column)


@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(32, 4, 1), (24, 6, 2), (5, 8, 3)])
def test_sinkhorn_plan_matches_float64_reference_and_marginals(
    tokens: int, experts: int, top_k: int
) -> None:
    logits = _logits(tokens, experts, seed=tokens)
    plan_fn = jax.jit(sinkhorn_log_plan, static_argnames=("top_k", "num_iters", "tolerance"))
    plan = np.exp(np.asarray(plan_fn(logits, top_k=top_k, num_iters=200, tolerance=0.0)))
    expected = _sinkhorn_reference(np.asarray(logits), top_k, 200, 0.0)
    np.testing.assert_allclose(plan, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(plan.sum(axis=1), top_k, rtol=1e-4)
    np.testing.assert_allclose(plan.sum(axis=0), tokens * top_k / experts, rtol=1e-4)


def test_sinkhorn_stops_early_at_the_tolerance() -> None:
    logits = _logits(16, 4, seed=7)
    plan_fn = jax.jit(sinkhorn_log_plan, static_argnames=("top_k", "num_iters", "tolerance"))
    plan = np.exp(np.asarray(plan_fn(logits, top_k=2, num_iters=500, tolerance=1e-3)))
    expected = _sinkhorn_reference(np.asarray(logits), 2, 500, 1e-3)
    np.testing.assert_allclose(plan, expected, rtol=1e-4, atol=1e-6)
    # Stopped on the row error: rows within ~1e-3 (log scale), columns exact.
    row_error = np.max(np.abs(np.log(plan.sum(axis=1) / 2)))
    assert 1e-5 < row_error < 1e-3
    np.testing.assert_allclose(plan.sum(axis=0), 16 * 2 / 4, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sinkhorn_balances_logits_that_all_prefer_one_expert(top_k: int, seed: int) -> None:
    tokens, experts = 64, 4
    logits = _logits(tokens, experts, seed=seed).at[:, 0].add(10.0)
    softmax_load = np.bincount(softmax_top_k(logits, top_k=top_k).expert_index[:, 0], None, 4)
    assert softmax_load[0] == tokens
    for router in (sinkhorn_router, selective_sinkhorn):
        # A fraction of 1 routes every token by the plan.
        options = {"sinkhorn_fraction": 1.0} if router is selective_sinkhorn else {}
        routed = router(logits, top_k=top_k, **options)
        load = np.bincount(np.asarray(routed.expert_index).ravel(), minlength=experts)
        assert load.max() / load.mean() <= 1.25, load
        assert len(np.unique(np.asarray(routed.expert_index), axis=None)) == experts


def test_sinkhorn_gates_come_from_softmax_or_plan() -> None:
    logits = _logits(12, 4, seed=3).at[:, 1].add(3.0)
    by_softmax = sinkhorn_router(logits, top_k=2, renormalize=False)
    by_plan = sinkhorn_router(logits, top_k=2, renormalize=False, gate_source="plan")
    np.testing.assert_array_equal(by_softmax.expert_index, by_plan.expert_index)
    np.testing.assert_allclose(
        by_softmax.combine_weights,
        jnp.take_along_axis(jax.nn.softmax(logits), by_softmax.expert_index, axis=-1),
        rtol=1e-6,
    )
    # A plan row divided by its mass top_k is a distribution over experts.
    plan = _sinkhorn_reference(np.asarray(logits), 2, 20, 1e-6) / 2
    chosen = np.take_along_axis(plan, np.asarray(by_plan.expert_index), axis=-1)
    np.testing.assert_allclose(by_plan.combine_weights, chosen, rtol=1e-4)
    renormalized = sinkhorn_router(logits, top_k=2, gate_source="plan").combine_weights
    np.testing.assert_allclose(renormalized, chosen / chosen.sum(-1, keepdims=True), rtol=1e-4)


def test_sinkhorn_replaces_the_balancing_loss_but_reports_it() -> None:
    logits = _logits(16, 4)
    routed = sinkhorn_router(logits, top_k=2)
    assert float(routed.aux_losses["load_balance"]) == 0.0
    np.testing.assert_allclose(
        routed.aux_losses["load_balance_unweighted"],
        load_balance_loss(routed.router_probs, routed.expert_index),
    )
    selective = selective_sinkhorn(logits, top_k=2)
    assert float(selective.aux_losses["load_balance"]) == 0.0
    assert float(selective.aux_losses["router_z"]) == 0.0
    assert float(selective.aux_losses["router_z_unweighted"]) > 0.0


def test_sinkhorn_routes_like_softmax_top_k_outside_training() -> None:
    logits = _logits(16, 4).at[:, 0].add(10.0)
    expected = softmax_top_k(logits, top_k=2)
    _assert_same_routing(sinkhorn_router(logits, top_k=2, train=False), expected, exact=False)
    _assert_same_routing(
        selective_sinkhorn(logits, top_k=2, train=False, rng=jax.random.key(0)),
        expected,
        exact=False,
    )


def test_selective_sinkhorn_routes_the_chosen_share_of_tokens_by_the_plan() -> None:
    logits = _logits(64, 4, seed=4).at[:, 0].add(10.0)
    plan_route = sinkhorn_router(logits, top_k=2, gate_source="plan")
    softmax_route = softmax_top_k(logits, top_k=2)
    # Without a key, tokens 3, 7, 11, ... (every fourth) follow the plan for a fraction of 1/4.
    routed = selective_sinkhorn(logits, top_k=2, sinkhorn_fraction=0.25)
    by_plan = np.arange(64) % 4 == 3
    np.testing.assert_array_equal(routed.expert_index[by_plan], plan_route.expert_index[by_plan])
    np.testing.assert_array_equal(
        routed.expert_index[~by_plan], softmax_route.expert_index[~by_plan]
    )
    np.testing.assert_allclose(
        routed.combine_weights[by_plan], plan_route.combine_weights[by_plan], rtol=1e-6
    )
    # With a key: every token follows one of the two, reproducibly, and both occur.
    jitted = _jit(selective_sinkhorn, "top_k")
    keyed = jitted(logits, top_k=2, rng=jax.random.key(5), sinkhorn_fraction=0.5)
    again = jitted(logits, top_k=2, rng=jax.random.key(5), sinkhorn_fraction=0.5)
    np.testing.assert_array_equal(keyed.expert_index, again.expert_index)
    is_plan = np.all(keyed.expert_index == plan_route.expert_index, axis=-1)
    is_softmax = np.all(keyed.expert_index == softmax_route.expert_index, axis=-1)
    assert np.all(is_plan | is_softmax)
    differs = ~np.all(plan_route.expert_index == softmax_route.expert_index, axis=-1)
    assert 0.2 < np.mean(is_plan[differs]) < 0.8
    # A fraction of 0 is softmax top-k.
    none = selective_sinkhorn(logits, top_k=2, sinkhorn_fraction=0.0, rng=jax.random.key(5))
    np.testing.assert_array_equal(none.expert_index, softmax_route.expert_index)


def test_selective_sinkhorn_gates_differentiate_through_the_plan() -> None:
    def total_gate_on_expert_0(logits: jax.Array) -> jax.Array:
        routed = selective_sinkhorn(logits, top_k=1, sinkhorn_fraction=1.0, renormalize=False)
        return jnp.sum(jnp.where(routed.expert_index == 0, routed.combine_weights, 0.0))

    grad = jax.jit(jax.grad(total_gate_on_expert_0))(_logits(16, 4, seed=6))
    assert bool(jnp.all(jnp.isfinite(grad))) and bool(jnp.any(grad != 0.0))


@pytest.mark.parametrize(
    ("router", "options", "match"),
    [
        (sinkhorn_router, {"num_iters": 0}, r"num_iters: got 0; allowed: an int >= 1"),
        (sinkhorn_router, {"tolerance": -1.0}, r"tolerance: got -1.0; allowed: finite and >= 0"),
        (sinkhorn_router, {"gate_source": "x"}, r"gate_source: got 'x'; allowed: softmax, plan"),
        (selective_sinkhorn, {"sinkhorn_fraction": 1.5}, r"sinkhorn_fraction: got 1.5"),
        (selective_sinkhorn, {"num_iters": 0, "train": False}, r"num_iters: got 0"),
    ],
)
def test_sinkhorn_routers_reject_bad_options(router, options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        router(_logits(4, 4), top_k=1, **options)


# --- hash and random-fixed -----------------------------------------------------------------


def _mix32_reference(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


@pytest.mark.parametrize("router", [hash_router, random_fixed])
def test_token_id_routers_give_a_token_the_same_experts_everywhere(router) -> None:
    top_k, experts = 2, 5
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 40, size=n) for n in (30, 17)]
    seen: dict[int, tuple[int, ...]] = {}
    for seed, ids in enumerate(batches):
        # Different logits, positions and batch sizes: only the id may matter.
        routed = router(_logits(len(ids), experts, seed=seed), top_k=top_k, token_ids=ids)
        chex.assert_type(routed.expert_index, jnp.int32)
        for token_id, experts_of_token in zip(ids, np.asarray(routed.expert_index), strict=True):
            assert len(set(experts_of_token)) == top_k
            assert seen.setdefault(int(token_id), tuple(experts_of_token)) == tuple(
                experts_of_token
            )
        np.testing.assert_array_equal(routed.combine_weights, 1.0 / top_k)
        assert float(routed.aux_losses["load_balance"]) == 0.0


def test_hash_matches_numpy_hash_and_spreads_ids_evenly() -> None:
    experts, seed = 4, 3
    ids = np.arange(4096)
    salt = _mix32_reference(np.array([seed + 0x9E3779B9]))
    keys = _mix32_reference(ids.astype(np.uint64) ^ salt)
    scores = _mix32_reference(keys[:, None] + np.arange(experts))
    expected = np.argmax(scores, axis=-1)
    index = hash_expert_index(jnp.asarray(ids, jnp.int32), experts, 1, seed)
    np.testing.assert_array_equal(index[:, 0], expected)
    load = np.bincount(expected, minlength=experts) / len(ids)
    np.testing.assert_allclose(load, 1 / experts, atol=0.03)
    assert np.mean(expected != np.asarray(hash_expert_index(jnp.asarray(ids), 4, 1, 0))[:, 0]) > 0.5


def test_random_fixed_tables_depend_on_the_seed() -> None:
    ids = jnp.arange(256, dtype=jnp.int32)
    logits = _logits(256, 8)
    first = random_fixed(logits, top_k=2, token_ids=ids, table_seed=0).expert_index
    again = random_fixed(logits, top_k=2, token_ids=ids, table_seed=0).expert_index
    other = random_fixed(logits, top_k=2, token_ids=ids, table_seed=1).expert_index
    np.testing.assert_array_equal(first, again)
    assert np.mean(np.asarray(first != other)) > 0.5
    # Ids wrap modulo vocab_size.
    wrapped = random_fixed(logits[:4], top_k=2, token_ids=jnp.array([256, 257, 258, -1]))
    np.testing.assert_array_equal(wrapped.expert_index, first[jnp.array([0, 1, 2, 255])])


def test_token_id_routers_softmax_gates() -> None:
    ids = jnp.arange(8, dtype=jnp.int32)
    logits = _logits(8, 4)
    routed = hash_router(logits, top_k=2, token_ids=ids, gate="softmax", renormalize=False)
    chosen = jnp.take_along_axis(jax.nn.softmax(logits), routed.expert_index, axis=-1)
    np.testing.assert_allclose(routed.combine_weights, chosen, rtol=1e-6)
    renormalized = hash_router(logits, top_k=2, token_ids=ids, gate="softmax")
    np.testing.assert_allclose(
        renormalized.combine_weights, chosen / chosen.sum(-1)[:, None], rtol=1e-6
    )


@pytest.mark.parametrize("router", [hash_router, random_fixed])
def test_token_id_routers_reject_missing_or_bad_token_ids(router) -> None:
    with pytest.raises(ValueError, match=r"token_ids: got None; allowed: an int array"):
        router(_logits(4, 4), top_k=1)
    with pytest.raises(ValueError, match=r"token_ids: got 'int32\[3\]'"):
        router(_logits(4, 4), top_k=1, token_ids=jnp.arange(3))
    with pytest.raises(ValueError, match=r"gate: got 'x'; allowed: uniform, softmax"):
        router(_logits(4, 4), top_k=1, token_ids=jnp.arange(4), gate="x")


def test_random_fixed_rejects_bad_vocab_size() -> None:
    with pytest.raises(ValueError, match=r"vocab_size: got 0; allowed: an int >= 1"):
        random_fixed(_logits(4, 4), top_k=1, token_ids=jnp.arange(4), vocab_size=0)


# --- top-p dynamic routing -----------------------------------------------------------------


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
    logits = _logits(16, experts, seed=seed)
    routed = _jit(top_p_router, "top_k", "top_p")(logits, top_k=top_k, top_p=top_p)
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
    logits = _logits(32, 6, seed=2)
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
        top_p_router(_logits(4, 4), top_k=2, top_p=top_p)


@pytest.mark.parametrize("num_layers", [1, 2, 5, 8])
@pytest.mark.parametrize("kind", ["uniform", "descending", "ascending", "pyramid"])
def test_capacity_schedule_mean_is_the_base_and_shape_follows_kind(
    num_layers: int, kind: str
) -> None:
    factors = np.asarray(capacity_schedule(num_layers, 1.25, kind))
    assert factors.shape == (num_layers,)
    np.testing.assert_allclose(factors.mean(), 1.25, rtol=1e-12)
    assert np.all(factors >= 1.25 * 0.5 - 1e-12) and np.all(factors <= 1.25 * 1.5 + 1e-12)
    steps = np.diff(factors)
    if kind == "uniform" or num_layers == 1:
        np.testing.assert_allclose(factors, 1.25, rtol=1e-12)
    elif kind == "descending":
        assert np.all(steps < 0)
    elif kind == "ascending":
        assert np.all(steps > 0)
    else:
        peak = np.argmax(factors)
        assert np.all(steps[:peak] >= 0) and np.all(steps[peak:] <= 0)
        assert peak in ((num_layers - 1) // 2, num_layers // 2)
        if num_layers > 2:
            assert factors[peak] > factors[0] and factors[peak] > factors[-1]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 1.0, "uniform"), r"num_layers: got 0; allowed: an int >= 1"),
        ((4, 0.0, "uniform"), r"base_capacity_factor: got 0.0; allowed: finite and > 0"),
        ((4, 1.0, "wave"), r"kind: got 'wave'; allowed: uniform, descending, ascending, pyramid"),
        ((4, 1.0, "pyramid", 1.0), r"spread: got 1.0; allowed: in \[0, 1\)"),
    ],
)
def test_capacity_schedule_rejects_bad_arguments(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        capacity_schedule(*args)
