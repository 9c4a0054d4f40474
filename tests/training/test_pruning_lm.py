"""Masked pruning and SR-STE inside the LM train state, step, loop, checkpoints and eval."""

import dataclasses
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import config as config_lib
from moejax.evaluation import evaluate_workdir
from moejax.parallel import sharding
from moejax.pruning import MethodConfig, PruningConfig, find_prune_state, get_masks, wrap_optimizer
from moejax.training import state as state_lib
from moejax.training.checkpoint import Checkpointer
from moejax.training.loop import train
from moejax.training.pruning import (
    EXPERT_MIN_NDIM,
    EXPERT_WEIGHTS,
    capture_moe_inputs,
    dsnot_refine_moe,
    one_shot_masks,
    with_masks,
)
from moejax.training.step import forward, make_train_step, routing_noise_key

EXPERTS = (f"pruning.param_regex={EXPERT_WEIGHTS}", f"pruning.min_ndim={EXPERT_MIN_NDIM}")
MASKED = ("pruning.method.name=masked",)
SRSTE = (
    *EXPERTS,
    "pruning.method.name=srste",
    "pruning.score.name=magnitude",
    "pruning.pattern.name=nm",
    "pruning.schedule.name=none",
    "pruning.pattern.options.axis=1",
)


def _mesh(devices, **sizes):
    axes = {"data": 1, "fsdp": 1, "expert": 1, "tensor": 1, **sizes}
    return sharding.make_mesh(axes, devices)


def _named(tree):
    from moejax.pruning import path_name

    return {path_name(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _nm_reference(w: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Keeps the n largest |w| of every m consecutive entries along `axis` (numpy)."""
    moved = np.moveaxis(np.abs(w), axis, -1)
    groups = moved.reshape(*moved.shape[:-1], -1, m)
    order = np.argsort(-groups, axis=-1, kind="stable")
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


def _batch(seed=0, batch=8, length=32):
    tokens = np.random.default_rng(seed).integers(0, 256, (batch, length + 1), dtype=np.int32)
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}


# ----------------------------------------------------------------------------- config


def test_pruning_group_overrides_in_any_order_and_round_trips_through_json(tmp_path):
    config = config_lib.apply_overrides(config_lib.Config(), list(reversed(SRSTE)))
    assert config.pruning.method.name == "srste" and config.pruning.pattern.options.axis == 1
    config_lib.save_json(config, tmp_path / "config.json")
    assert config_lib.load_json(tmp_path / "config.json") == config
    # A config.json written before the pruning group existed loads with pruning off.
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["pruning"]
    assert config_lib.from_dict(saved).pruning.method.name == "none"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pruning.method.name=magnitud"], "pruning.method.name: got 'magnitud'; allowed: "),
        (["pruning.method.name=srste"], "pruning.pattern.name: got 'unstructured'"),
        (["pruning.target_sparsity=1.5"], "pruning.target_sparsity: got 1.5"),
        (["pruning.sparsity=0.5"], "allowed fields of pruning"),
        (["pruning.method=masked"], "'pruning.method' is a group"),
        (["pruning.nm_axis=1"], "'pruning.nm_axis' (it is pruning.pattern.options.axis now)"),
        (["pruning.mode=srste"], "'pruning.mode' (it is pruning.method.name now)"),
        (
            ["pruning.begin_step=3"],
            "'pruning.begin_step' (it is pruning.schedule.options.begin_step now)",
        ),
        (["pruning.pattern.options.n=2"], "unknown field 'pruning.pattern.options.n'"),
    ],
)
def test_bad_pruning_overrides_are_config_errors(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.apply_overrides(config_lib.Config(), overrides)


@pytest.mark.parametrize("method", ["maskllm", "dsnot", "lottery"])
def test_a_method_train_py_would_not_run_whole_is_rejected(tiny_config, method):
    """MaskLLM, DSnoT and lottery rounds change masks through their refine hook, which the
    LM's loop never calls: train.py refuses them rather than train with plain masks."""
    config = tiny_config(f"pruning.method.name={method}")
    with pytest.raises(config_lib.ConfigError, match=f"pruning.method.name: got '{method}'"):
        config_lib.validate(config, 1)


def test_a_schedule_that_never_prunes_and_a_regex_that_matches_nothing_are_rejected(
    tiny_config,
):
    late = tiny_config(*MASKED, "pruning.schedule.options.begin_step=20")
    with pytest.raises(config_lib.ConfigError, match="pruning.schedule.options.begin_step: got 20"):
        config_lib.validate(late, 1)
    nothing = tiny_config(*MASKED, "pruning.param_regex=no_such_weight")
    with pytest.raises(config_lib.ConfigError, match="matches no parameter"):
        state_lib.state_layout(nothing, _mesh(jax.devices()[:1]))
    odd_axis = tiny_config(*SRSTE, "pruning.pattern.options.m=3", "pruning.pattern.options.n=1")
    with pytest.raises(
        config_lib.ConfigError,
        match=r"pruning.pattern.options: got NMOptions\(n=1, m=3, axis=1\).*a multiple of m=3",
    ):
        state_lib.state_layout(odd_axis, _mesh(jax.devices()[:1]))


def test_pruning_off_leaves_the_optimizer_state_unchanged(tiny_config):
    config = tiny_config()
    layout = state_lib.state_layout(config, _mesh(jax.devices()[:1]))
    plain = jax.eval_shape(state_lib.make_optimizer(config.train).init, layout.spec.abstract_params)
    assert layout.pruning is None
    assert jax.tree.structure(layout.abstract_state["opt_state"]) == jax.tree.structure(plain)


# ----------------------------------------------------------------------------- sharding


def test_masks_are_sharded_like_their_params_on_an_expert_mesh(tiny_config):
    config = tiny_config(
        *EXPERTS, *MASKED, "mesh.data=4", "mesh.expert=2", "model.moe.dispatch.name=expert_parallel"
    )
    mesh = _mesh(jax.devices(), data=4, expert=2)
    layout = state_lib.state_layout(config, mesh)
    state = state_lib.init_state(config, layout)
    params, masks = _named(state["params"]), _named(get_masks(state["opt_state"]))
    assert params.keys() == masks.keys()
    for name, param in params.items():
        assert masks[name].sharding.spec == param.sharding.spec, name
    assert masks["blocks/0/ffn/w_gate"].sharding.spec[0] == "expert"
    declared = _named(find_prune_state(layout.shardings["opt_state"]).masks)
    assert all(declared[n].spec == params[n].sharding.spec for n in params)


def test_masks_get_the_shardings_of_their_params_in_the_lm_train_state():
    config = config_lib.load_config_file(pathlib.Path(__file__).parents[2] / "configs/tiny.py")
    config = dataclasses.replace(config, mesh=config_lib.MeshConfig(data=2, fsdp=2, expert=2))
    spec = state_lib.model_spec(config.model)
    pruning = PruningConfig(method=MethodConfig("masked"), param_regex=r"(w_gate|w_up|w_down)$")
    optimizer = wrap_optimizer(state_lib.make_optimizer(config.train), pruning)
    mesh = sharding.make_mesh(config_lib.validate_mesh(config.mesh, jax.device_count()))
    _, shardings = state_lib.state_shardings(spec, optimizer, mesh)
    param_shardings = sharding.tree_shardings(mesh, spec.logical_axes)
    assert shardings["opt_state"].masks == param_shardings
    assert len(jax.tree.leaves(shardings["opt_state"].masks)) > 0


# ----------------------------------------------------------------------------- train step


def _one_step(config, *, masks=None):
    config = config_lib.apply_overrides(config, ["model.num_layers=1"])  # compiles faster
    layout = state_lib.state_layout(config, _mesh(jax.devices()[:1]))
    state = state_lib.init_state(config, layout)
    if masks is not None:
        chosen = masks(jax.device_get(state["params"]), layout.pruning.prunable)
        state["opt_state"] = with_masks(state["opt_state"], chosen)
    before = jax.device_get(state)
    batch = _batch()
    after, metrics = make_train_step(layout, _mesh(jax.devices()[:1]))(state, batch)
    return layout, before, jax.device_get(after), jax.device_get(metrics), batch


def _reference_loss(layout, config, params, batch):
    """The cross-entropy of the step-0 batch with `params` as they are (no pruning logic)."""
    rng = routing_noise_key(config.train.seed, jnp.int32(0))
    loss = jax.jit(lambda p: forward(layout.spec, {"params": p, "router_state": {}}, batch, rng)[0])
    return loss(params)


def test_srste_step_uses_nm_weights_forward_and_straight_through_gradients(tiny_config):
    config = tiny_config(*SRSTE, "train.warmup_steps=0", "train.weight_decay=0.0")
    layout, before, after, metrics, batch = _one_step(config)
    flags = _named(layout.pruning.prunable)
    projected = jax.tree.map(
        lambda p, keep: np.where(_nm_reference(p, 2, 4, 1), p, 0.0) if keep else p,
        before["params"],
        layout.pruning.prunable,
    )
    ce = _reference_loss(layout, config, projected, batch)
    np.testing.assert_allclose(metrics["ce_loss"], ce, rtol=1e-5)
    assert metrics["pruning/sparsity"] == 0.5

    lr = config.train.learning_rate
    old, new = _named(before["params"]), _named(after["params"])
    masks = _named(get_masks(after["opt_state"]))
    for name, keep in flags.items():
        if not keep:
            assert masks[name].all()
            continue
        pruned = ~_nm_reference(old[name], 2, 4, 1)
        # Straight through: Adam's first step moves every weight by about lr, the pruned ones
        # included (a masked gradient would leave them where they were).
        moved = np.abs(new[name] - old[name])[pruned]
        assert moved.min() > 0.5 * lr, name
        np.testing.assert_array_equal(masks[name], _nm_reference(new[name], 2, 4, 1))
        assert np.count_nonzero(new[name][~masks[name]]) > 0  # the dense weights live on
    deployed = _named(state_lib.model_variables(after)["params"])
    for name, keep in flags.items():
        expected = np.where(masks[name], new[name], 0.0) if keep else new[name]
        np.testing.assert_array_equal(deployed[name], expected)


def test_masked_step_forwards_masked_weights_and_zeroes_the_pruned_ones(tiny_config):
    config = tiny_config(*EXPERTS, *MASKED, "pruning.schedule.name=none")
    rng = np.random.default_rng(1)

    def random_masks(params, prunable):
        return jax.tree.map(
            lambda p, keep: jnp.asarray(
                rng.random(p.shape) < 0.6 if keep else np.ones(p.shape, bool)
            ),
            params,
            prunable,
        )

    layout, before, after, metrics, batch = _one_step(config, masks=random_masks)
    masks = get_masks(before["opt_state"])
    masked = jax.tree.map(lambda p, m: np.where(m, p, 0.0), before["params"], masks)
    ce = _reference_loss(layout, config, masked, batch)
    np.testing.assert_allclose(metrics["ce_loss"], ce, rtol=1e-5)
    for name, mask in _named(masks).items():
        np.testing.assert_array_equal(_named(after["params"])[name][~mask], 0.0)
    chosen = [
        m
        for m, keep in zip(
            jax.tree.leaves(masks), jax.tree.leaves(layout.pruning.prunable), strict=True
        )
        if keep
    ]
    expected = sum(np.count_nonzero(~m) for m in chosen) / sum(m.size for m in chosen)
    np.testing.assert_allclose(metrics["pruning/sparsity"], expected, rtol=1e-6)
    assert 0.3 < expected < 0.5


# ----------------------------------------------------------------------------- loop, checkpoint


def test_pruned_run_keeps_zeros_logs_sparsity_and_restores_masks_onto_another_mesh(
    tiny_config, tmp_path
):
    overrides = (*EXPERTS, *MASKED, "pruning.schedule.options.begin_step=3")
    config = tiny_config(*overrides, "train.steps=8", "train.eval_every=4", "mesh.data=1")
    workdir = tmp_path / "run"
    train(config, workdir, devices=jax.devices()[:1], progress=False)

    def restore(devices, **sizes):
        mesh_config = config_lib.MeshConfig(**{"data": 1, **sizes})
        layout = state_lib.state_layout(
            dataclasses.replace(config, mesh=mesh_config), _mesh(devices, **sizes)
        )
        checkpointer = Checkpointer(workdir / "checkpoints", keep=3, async_save=False)
        try:
            return checkpointer.restore(8, layout.restore_target())[0]
        finally:
            checkpointer.close()

    one = restore(jax.devices()[:1])
    four = restore(jax.devices()[:4], data=2, expert=2)
    masks_one, masks_four = (
        _named(get_masks(one["opt_state"])),
        _named(get_masks(four["opt_state"])),
    )
    params_four = _named(four["params"])
    for name, mask in masks_one.items():
        np.testing.assert_array_equal(np.asarray(masks_four[name]), np.asarray(mask))
        assert masks_four[name].sharding.spec == params_four[name].sharding.spec, name
        np.testing.assert_array_equal(
            np.asarray(_named(one["params"])[name])[~np.asarray(mask)], 0.0
        )
        expected = 0.5 if name.endswith(("ffn/w_gate", "ffn/w_up", "ffn/w_down")) else 0.0
        assert 1 - np.asarray(mask).mean() == expected, name

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if r["split"] == "eval"}
    assert evals[0]["sparsity/prunable"] == 0.0 and evals[8]["sparsity/prunable"] == 0.5
    trains = [r for r in records if r["split"] == "train"]
    assert trains[-1]["pruning/sparsity"] == 0.5

    results = evaluate_workdir(workdir, devices=jax.devices()[:1])
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(one["params"]))]
    total = sum(np.count_nonzero(leaf == 0) for leaf in leaves) / sum(leaf.size for leaf in leaves)
    assert results["sparsity/layer0"] == results["sparsity/layer1"] == 0.5
    np.testing.assert_allclose(results["sparsity/total"], total, rtol=1e-12)


# ----------------------------------------------------------------------------- DSnoT


def _tiny_variables(tiny_config, *overrides):
    config = tiny_config(*EXPERTS, *MASKED, *overrides)
    layout = state_lib.state_layout(config, _mesh(jax.devices()[:1]))
    state = jax.device_get(state_lib.init_state(config, layout))
    return config, layout, {"params": state["params"], "router_state": {}}


def test_capture_records_each_moe_layers_ffn_input_and_routing(tiny_config):
    _, layout, variables = _tiny_variables(tiny_config)
    tokens = _batch(2)["inputs"]
    captured = jax.jit(lambda v, t: capture_moe_inputs(layout.spec.merge(v), t))(variables, tokens)
    logits, aux = jax.jit(lambda v, t: layout.spec.merge(v)(t, train=False))(variables, tokens)
    assert sorted(captured) == [0, 1]
    for layer, (x, expert_index) in captured.items():
        assert x.shape == (tokens.size, 32) and expert_index.shape == (tokens.size, 2)
        np.testing.assert_array_equal(expert_index[:, 0], aux[layer]["top1_expert"])
        # The recorded rows are the router's input: their logits pick the same top expert.
        router = np.asarray(variables["params"]["blocks"][layer]["ffn"]["router"], np.float64)
        logits64 = np.asarray(x, np.float64) @ router
        np.testing.assert_array_equal(np.argmax(logits64, axis=1), expert_index[:, 0])


def test_dsnot_refine_moe_keeps_the_sparsity_and_touches_only_expert_masks(tiny_config):
    config, layout, variables = _tiny_variables(tiny_config)
    masks = jax.device_get(one_shot_masks(config.pruning, variables["params"]))
    refined, reports = dsnot_refine_moe(
        layout.spec.merge,
        variables,
        masks,
        layout.pruning.prunable,
        [np.asarray(_batch(4)["inputs"])],
        max_cycles=10,
    )
    assert sorted(reports) == ["layer0", "layer1"]
    for report in reports.values():
        assert report["error_after"] <= report["error_before"] and report["swaps"] > 0
    old, new, flags = _named(masks), _named(refined), _named(layout.pruning.prunable)
    for name, mask in old.items():
        assert new[name].sum() == mask.sum(), name
        if not flags[name]:
            assert new[name].all(), name
    assert any((new[n] != old[n]).any() for n in old if flags[n])
