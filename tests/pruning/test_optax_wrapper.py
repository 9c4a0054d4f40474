"""Pruner and prune_optax: masks in the optimizer state, pruned weights held at zero,
rewinding, registry look-ups."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.pruning import (
    ParamFilter,
    Pruner,
    apply_masks,
    get_masks,
    prune_optax,
    replace_prune_state,
    rewound_params,
    sparsity_report,
)
from moejax.pruning.patterns import BlockOptions, NMOptions
from moejax.pruning.schedules import Polynomial


def _params():
    rng = np.random.default_rng(0)
    return {
        "dense": {
            "kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
            "bias": jnp.ones(8),
        },
        "out": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)},
    }


def _loss(params):
    # Pushes every weight away from zero, so only the masking can keep pruned ones there.
    return sum(jnp.sum((x - 3.0) ** 2) for x in jax.tree.leaves(params))


def _run(optimizer, params, steps):
    @jax.jit
    def step(params, state):
        updates, state = optimizer.update(jax.grad(_loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = optimizer.init(params)
    history = []
    for _ in range(steps):
        params, state = step(params, state)
        history.append(params)
    return params, state, history


def test_pruned_weights_stay_exactly_zero_through_adamw_with_decay_and_momentum():
    inner = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.05, weight_decay=0.1))
    pruner = Pruner(schedule=Polynomial(0.75, begin=0, end=20, frequency=5))
    params, state, history = _run(prune_optax(inner, pruner), _params(), 60)
    masks = get_masks(state)
    report = sparsity_report(masks)
    assert report["dense/kernel"] == pytest.approx(0.75) and report["out/kernel"] == 0.75
    assert report["dense/bias"] == 0.0  # 1-d leaves are not prunable by default
    for later in history[20:]:
        for p, m in zip(jax.tree.leaves(later), jax.tree.leaves(masks), strict=True):
            assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
    # Masks only shrink: the masks at step 20 are final and later steps never revive a weight.
    assert sparsity_report(params)["dense/kernel"] == pytest.approx(0.75)
    # Kept weights did train towards 3.
    assert float(jnp.max(params["dense"]["kernel"])) > 2.0


def test_prune_state_round_trips_through_flatten_and_host_copies():
    optimizer = prune_optax(optax.adamw(1e-2), Pruner(rewind_step=2))
    _, state, _ = _run(optimizer, _params(), 5)
    leaves, treedef = jax.tree.flatten(state)
    restored = jax.tree.unflatten(treedef, [np.array(leaf) for leaf in leaves])
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, np.asarray(b))


def test_masks_have_the_params_structure_so_they_shard_like_params():
    optimizer = prune_optax(optax.adam(1e-3), Pruner())
    state = optimizer.init(_params())
    assert jax.tree.structure(state.masks) == jax.tree.structure(_params())


def test_rewind_point_is_the_params_before_update_k():
    optimizer = prune_optax(optax.adam(1e-2), Pruner(rewind_step=3))
    params, state, history = _run(optimizer, _params(), 6)
    stored = state.rewind_params
    for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(history[2]), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    masks = jax.tree.map(lambda p: jnp.asarray(np.arange(p.size).reshape(p.shape) % 2 == 0), params)
    state = replace_prune_state(state, state._replace(masks=masks))
    rewound = rewound_params(state)
    for r, h, m in zip(
        jax.tree.leaves(rewound), jax.tree.leaves(history[2]), jax.tree.leaves(masks), strict=True
    ):
        r, h, m = np.asarray(r), np.asarray(h), np.asarray(m)
        assert np.array_equal(r[m], h[m]) and np.all(r[~m] == 0)


def test_masks_set_from_outside_inside_a_chain_are_enforced():
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), prune_optax(optax.sgd(0.1), Pruner()))
    params = _params()
    state = optimizer.init(params)
    masks = jax.tree.map(lambda p: p > 0, params)
    inner = get_masks(state)
    assert all(bool(m.all()) for m in jax.tree.leaves(inner))
    from moejax.pruning import find_prune_state

    state = replace_prune_state(state, find_prune_state(state)._replace(masks=masks))
    updates, _ = optimizer.update(jax.grad(_loss)(params), state, params)
    new = optax.apply_updates(params, updates)
    assert jax.tree.all(jax.tree.map(lambda p, m: bool(jnp.all(p[~m] == 0)), new, masks))
    expected = apply_masks(new, masks)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), new, expected))


def test_expert_pattern_prunes_the_same_experts_in_sibling_weights():
    rng = np.random.default_rng(4)
    params = {
        "moe": {
            name: jnp.asarray(rng.normal(size=shape), jnp.float32)
            for name, shape in [("w_gate", (8, 4, 6)), ("w_up", (8, 4, 6)), ("w_down", (8, 6, 4))]
        }
    }
    pruner = Pruner(pattern="expert", param_filter=ParamFilter(r"w_(gate|up|down)$", 3))
    masks = pruner.compute_masks(params, pruner.init_masks(params), 0.5, jax.random.key(0))
    experts = [np.asarray(m).reshape(8, -1).all(axis=1) for m in masks["moe"].values()]
    assert all(np.array_equal(e, experts[0]) for e in experts) and experts[0].sum() == 4


def test_update_without_params_is_an_error():
    optimizer = prune_optax(optax.sgd(0.1), Pruner())
    state = optimizer.init(_params())
    with pytest.raises(ValueError, match=r"params: got None; allowed: the params"):
        optimizer.update(_params(), state)


def test_unknown_pattern_or_score_lists_the_registered_ones():
    with pytest.raises(
        ValueError, match="pruning pattern: got 'diagonal'; allowed: unstructured, nm"
    ):
        Pruner(pattern="diagonal")
    with pytest.raises(ValueError, match="pruning score: got 'obs'; allowed: magnitude, random"):
        Pruner(score="obs")


def test_options_of_another_entry_are_refused():
    with pytest.raises(ValueError, match="nm options: got BlockOptions"):
        Pruner(pattern="nm", pattern_options=BlockOptions())


def test_rewind_step_must_be_none_or_non_negative():
    with pytest.raises(ValueError, match="rewind_step: got -1; allowed: None or an int >= 0"):
        Pruner(rewind_step=-1)


def test_rewound_params_without_a_rewind_point_is_an_error():
    optimizer = prune_optax(optax.sgd(0.1), Pruner())
    with pytest.raises(ValueError, match="rewind_step: got None"):
        rewound_params(optimizer.init(_params()))


def test_nm_pattern_options_reach_the_masks():
    params = _params()
    pruner = Pruner(pattern="nm", pattern_options=NMOptions(n=1, m=4, axis=0))
    masks = pruner.compute_masks(params, pruner.init_masks(params), 0.0, jax.random.key(0))
    groups = np.asarray(masks["dense"]["kernel"]).reshape(4, 4, 8).sum(axis=1)
    assert (groups == 1).all()
