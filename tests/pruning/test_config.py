"""PruningConfig: each choice a registry name with its typed options nested under it, the
checks, and the Pruner it makes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax.config import ConfigError
from moejax.pruning import (
    MethodConfig,
    PatternConfig,
    PruningConfig,
    PruningOptions,
    ScheduleConfig,
    ScoreConfig,
    make_pruner,
    prunable_tree,
    prune_optax,
    sparsity_report,
)
from moejax.pruning.patterns import NMOptions
from tests.pruning.test_optax_wrapper import _params, _run

MASKED = MethodConfig("masked")


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
    config = PruningConfig(method=MASKED, param_regex=r"moe/(w_gate|w_up|w_down)$")
    flags = prunable_tree(params, make_pruner(config).param_filter)
    assert flags["layers_0"]["moe"] == {
        "w_gate": True,
        "w_up": True,
        "w_down": True,
        "router": {"kernel": False},
    }
    assert not flags["layers_0"]["attention"]["qkv"] and not flags["layers_0"]["norm"]["scale"]


@pytest.mark.parametrize("score", ["magnitude", "random", "snip"])
def test_one_shot_config_reaches_the_target_with_each_score(score):
    config = PruningConfig(
        method=MASKED,
        score=ScoreConfig(score),
        target_sparsity=0.5,
        schedule=ScheduleConfig.of("one_shot", begin_step=1),
    )
    _, state, _ = _run(prune_optax(optax.adam(1e-2), make_pruner(config)), _params(), 3)
    assert sparsity_report(state.masks)["dense/kernel"] == pytest.approx(0.5)


def test_global_erk_and_nm_configs_build_valid_masks():
    params = _params()
    for config, check in [
        (
            PruningConfig(
                method=MASKED,
                pattern=PatternConfig.of("unstructured", scope="global"),
                target_sparsity=0.6,
            ),
            0.6,
        ),
        (
            PruningConfig(
                method=MASKED,
                score=ScoreConfig("random"),
                pattern=PatternConfig.of("unstructured", density="erk"),
                target_sparsity=0.6,
            ),
            0.6,
        ),
        (PruningConfig(method=MASKED, pattern=PatternConfig.of("nm", n=2, m=4)), 0.5),
    ]:
        pruner = make_pruner(config)
        masks = pruner.compute_masks(params, pruner.init_masks(params), 0.6, jax.random.key(1))
        kernels = [masks["dense"]["kernel"], masks["out"]["kernel"]]
        pruned = sum(int((~m).sum()) for m in kernels) / sum(m.size for m in kernels)
        assert pruned == pytest.approx(check, abs=0.01)


def test_erk_gives_the_smaller_layer_the_higher_density():
    config = PruningConfig(
        method=MASKED,
        pattern=PatternConfig.of("unstructured", density="erk"),
        target_sparsity=0.6,
    )
    pruner = make_pruner(config)
    params = _params()
    masks = pruner.compute_masks(params, pruner.init_masks(params), 0.6, jax.random.key(1))
    report = sparsity_report(masks)
    # ERK densities ∝ (d_in + d_out) / (d_in d_out): 1/3 for [16, 8], 2/3 for [8, 4].
    assert report["dense/kernel"] == pytest.approx(2 / 3, abs=1 / 128)
    assert report["out/kernel"] == pytest.approx(1 / 3, abs=1 / 32)


def test_polynomial_schedule_options_reach_the_schedule():
    config = PruningConfig(
        method=MASKED,
        target_sparsity=0.6,
        schedule=ScheduleConfig.of(
            "polynomial", begin_step=10, end_step=20, frequency=5, initial_sparsity=0.2
        ),
    )
    schedule = config.make_schedule()
    values = [float(schedule.sparsity(step)) for step in (9, 10, 15, 20)]
    assert values == pytest.approx([0.0, 0.2, 0.6 - 0.4 * 0.5**3, 0.6])
    assert [bool(schedule.is_update_step(s)) for s in (10, 12, 15, 20, 25)] == [
        True,
        False,
        True,
        True,
        False,
    ]


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            lambda: {"method": MethodConfig("obs")},
            "pruning.method.name: got 'obs'; allowed: dsnot, lottery, none, masked",
        ),
        (lambda: {"pattern": PatternConfig("diagonal")}, "pruning.pattern.name: got 'diagonal'"),
        (
            lambda: {"score": ScoreConfig("obs")},
            "pruning.score.name: got 'obs'; allowed: magnitude",
        ),
        (lambda: {"schedule": ScheduleConfig("cosine")}, "pruning.schedule.name: got 'cosine'"),
        (lambda: {"target_sparsity": 1.0}, "pruning.target_sparsity: got 1.0"),
        (
            lambda: {"pattern": PatternConfig("nm", options=PruningOptions())},
            "pruning.pattern.options: got PruningOptions()",
        ),
        (
            lambda: {"schedule": ScheduleConfig.of("polynomial", initial_sparsity=0.6)},
            "pruning.schedule.options.initial_sparsity: got 0.6; allowed: <= the target",
        ),
        (lambda: {"param_regex": "("}, "regex"),
        (
            lambda: {"method": MethodConfig("srste")},
            "pruning.pattern.name: got 'unstructured'; allowed: 'nm' with "
            "pruning.method.name='srste'",
        ),
    ],
)
def test_pruning_config_errors_name_field_value_and_allowed(fields, message):
    # `fields` builds the choices inside the check: an unknown name fails when its group is.
    with pytest.raises(ConfigError, match=re.escape(message)):
        PruningConfig(**fields())


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: PatternConfig.of("nm", n=3, m=2), "m: got 2; allowed: >= n=3"),
        (
            lambda: ScheduleConfig.of("polynomial", begin_step=5, end_step=5),
            "end_step: got 5; allowed: > begin_step=5",
        ),
        (lambda: PatternConfig.of("unstructured", scope="row"), "scope: got 'row'"),
        (lambda: MethodConfig.of("srste", decay=-1.0), "decay: got -1.0; allowed: >= 0"),
    ],
)
def test_options_check_themselves_when_built(build, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build()


def test_make_pruner_is_none_when_pruning_is_off():
    assert make_pruner(PruningConfig()) is None
    assert not PruningConfig().enabled


def test_make_pruner_passes_each_choice_and_its_options():
    config = PruningConfig(
        method=MASKED,
        score=ScoreConfig("random"),
        pattern=PatternConfig.of("nm", n=1, m=8, axis=1),
        schedule=ScheduleConfig.of("iterative", rounds=3, frequency=10, begin_step=2),
        target_sparsity=0.7,
    )
    pruner = make_pruner(config)
    assert (pruner.pattern, pruner.pattern_options) == ("nm", NMOptions(1, 8, 1))
    assert pruner.score == "random"
    assert (pruner.schedule.rounds, pruner.schedule.round_steps, pruner.schedule.begin) == (
        3,
        10,
        2,
    )
    assert pruner.schedule.target == 0.7
    assert config.first_prune_step() == 2
    assert PruningConfig(method=MASKED, schedule=ScheduleConfig("none")).first_prune_step() is None


def test_masks_of_a_config_pattern_have_exact_groups():
    config = PruningConfig(method=MASKED, pattern=PatternConfig.of("nm", n=1, m=4, axis=0))
    pruner = make_pruner(config)
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)}
    masks = pruner.compute_masks(params, pruner.init_masks(params), 0.0, jax.random.key(0))
    assert (np.asarray(masks["w"]).reshape(2, 4, 3).sum(axis=1) == 1).all()
