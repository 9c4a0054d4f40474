"""prune_optax: masks in the optimizer state, pruned weights held at zero, rewinding, config."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.pruning import (
    ParamFilter,
    Pruner,
    PruningConfig,
    apply_masks,
    get_masks,
    make_pruner,
    prunable_tree,
    prune_optax,
    replace_prune_state,
    rewound_params,
    sparsity_report,
)
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


def test_param_filter_selects_only_moe_expert_weights():
    params = {
        "layers_0": {
            "moe": {
                "w_gate": jnp.ones((4, 8, 16)),
                "w_up": jnp.ones((4, 8, 16)),
                "w_down": jnp.ones((4, 16, 8)),
                "router": {"kernel": jnp.ones((8, 4))},
            },
            "attention": {"qkv": jnp.ones((8, 24))},
            "norm": {"scale": jnp.ones(8)},
        }
    }
    config = PruningConfig(method="magnitude", param_regex=r"moe/(w_gate|w_up|w_down)$")
    flags = prunable_tree(params, make_pruner(config).param_filter)
    assert flags["layers_0"]["moe"] == {
        "w_gate": True,
        "w_up": True,
        "w_down": True,
        "router": {"kernel": False},
    }
    assert not flags["layers_0"]["attention"]["qkv"] and not flags["layers_0"]["norm"]["scale"]


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


@pytest.mark.parametrize("method", ["magnitude", "random", "snip"])
def test_one_shot_config_reaches_the_target_with_each_score(method):
    config = PruningConfig(method=method, target_sparsity=0.5, schedule="one_shot", begin_step=1)
    _, state, _ = _run(prune_optax(optax.adam(1e-2), make_pruner(config)), _params(), 3)
    assert sparsity_report(state.masks)["dense/kernel"] == pytest.approx(0.5)


def test_global_erk_and_nm_configs_build_valid_masks():
    params = _params()
    for config, check in [
        (PruningConfig(method="magnitude", scope="global", target_sparsity=0.6), 0.6),
        (PruningConfig(method="random", density="erk", target_sparsity=0.6), 0.6),
        (PruningConfig(method="magnitude", pattern="nm", n=2, m=4), 0.5),
    ]:
        pruner = make_pruner(config)
        masks = pruner.compute_masks(params, pruner.init_masks(params), 0.6, jax.random.key(1))
        kernels = [masks["dense"]["kernel"], masks["out"]["kernel"]]
        pruned = sum(int((~m).sum()) for m in kernels) / sum(m.size for m in kernels)
        assert pruned == pytest.approx(check, abs=0.01)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"method": "obs"}, "pruning.method: got 'obs'; allowed: none, magnitude"),
        ({"pattern": "diagonal"}, "pruning.pattern: got 'diagonal'"),
        ({"target_sparsity": 1.0}, "pruning.target_sparsity: got 1.0"),
        ({"schedule": "polynomial", "begin_step": 5, "end_step": 5}, "pruning.end_step: got 5"),
        ({"n": 3, "m": 2}, "pruning.m: got 2; allowed: >= pruning.n=3"),
        ({"param_regex": "("}, "regex"),
    ],
)
def test_pruning_config_errors_name_field_value_and_allowed(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PruningConfig(**fields)


def test_make_pruner_is_none_when_pruning_is_off():
    assert make_pruner(PruningConfig()) is None


def test_update_without_params_is_an_error():
    optimizer = prune_optax(optax.sgd(0.1), Pruner())
    state = optimizer.init(_params())
    with pytest.raises(ValueError, match="params"):
        optimizer.update(_params(), state)


def test_masks_get_the_shardings_of_their_params_in_the_lm_train_state():
    import dataclasses

    from moejax import config as config_lib
    from moejax.parallel import sharding
    from moejax.pruning import wrap_optimizer
    from moejax.training import state as state_lib

    config = config_lib.load_config_file(pathlib.Path(__file__).parents[2] / "configs/tiny.py")
    config = dataclasses.replace(config, mesh=config_lib.MeshConfig(data=2, fsdp=2, expert=2))
    spec = state_lib.model_spec(config.model)
    pruning = PruningConfig(method="magnitude", param_regex=r"(w_gate|w_up|w_down)$")
    optimizer = wrap_optimizer(state_lib.make_optimizer(config.train), pruning)
    mesh = sharding.make_mesh(config_lib.validate_mesh(config.mesh, jax.device_count()))
    _, shardings = state_lib.state_shardings(spec, optimizer, mesh)
    param_shardings = sharding.tree_shardings(mesh, spec.logical_axes)
    assert shardings["opt_state"].masks == param_shardings
    assert len(jax.tree.leaves(shardings["opt_state"].masks)) > 0
