"""Adding a pattern, score, schedule or method takes one spec and one `register` call: toys
defined in this module, selected by name through the config (options from the command line),
compute masks through `Pruner` and `prune_optax`, and the toy method trains the language model.
"""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moejax import config as config_lib
from moejax.errors import require
from moejax.parallel import sharding
from moejax.pruning import (
    METHODS,
    PATTERNS,
    SCHEDULES,
    SCORES,
    MethodSpec,
    PatternSpec,
    PruningOptions,
    ScheduleSpec,
    ScoreSpec,
    get_masks,
    make_pruner,
    prune_optax,
    register,
)
from moejax.training import state as state_lib
from moejax.training.step import global_batch, make_train_step

ROOT = pathlib.Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class CheckerboardOptions(PruningOptions):
    offset: int = 0

    def __post_init__(self) -> None:
        require(self.offset in (0, 1), "offset", self.offset, "0 or 1")


def checkerboard(scores, names, sparsity, options: CheckerboardOptions):
    """Keeps the entries whose row + column + offset is even, whatever the scores."""
    del names, sparsity
    out = []
    for s in scores:
        rows, cols = jnp.indices(s.shape[-2:])
        out.append(jnp.broadcast_to((rows + cols + options.offset) % 2 == 0, s.shape))
    return out


@dataclasses.dataclass(frozen=True)
class SmallestOptions(PruningOptions):
    power: float = 1.0


def smallest_first(*, params, options: SmallestOptions):
    """-|w|^power: the pattern then keeps the smallest weights."""
    return jax.tree.map(lambda w: -(jnp.abs(w.astype(jnp.float32)) ** options.power), params)


@dataclasses.dataclass(frozen=True)
class StaircaseOptions(PruningOptions):
    per_step: float = 0.1


@dataclasses.dataclass(frozen=True)
class Staircase:
    target: float
    per_step: float

    def sparsity(self, step):
        return jnp.minimum(self.target, (jnp.asarray(step) + 1) * self.per_step)

    def is_update_step(self, step):
        return jnp.asarray(step) >= 0


def first_row_pruned(masks, *, params, pruner, prunable, options):
    """The toy method's record hook: the optimizer state holds masks that prune row 0 of
    every prunable matrix (axis -2), whatever the schedule did."""
    del masks, pruner, options

    def mask(p, keep):
        m = np.ones(p.shape, bool)
        if keep:
            m[..., 0, :] = False
        return jnp.asarray(m)

    return jax.tree.map(mask, params, prunable)


TOYS = (
    PatternSpec("checkerboard", checkerboard, CheckerboardOptions),
    ScoreSpec("smallest_first", smallest_first, needs=("params",), options=SmallestOptions),
    ScheduleSpec(
        "staircase",
        lambda target, options: Staircase(target, options.per_step),
        StaircaseOptions,
        first_step=lambda options: 0,
    ),
    MethodSpec("first_row", record=first_row_pruned),
)


@pytest.fixture
def toys():
    # Registered for these tests only, so other test modules see the built-in tables.
    specs = [register(spec) for spec in TOYS]
    yield [spec.name for spec in specs]
    for table, spec in zip((PATTERNS, SCORES, SCHEDULES, METHODS), specs, strict=True):
        del table[spec.name]


def _pruning(*overrides: str):
    config = config_lib.apply_overrides(config_lib.Config(), list(overrides))
    return config.pruning


def _params():
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)}


def test_toy_pattern_selected_by_config_with_its_options_from_the_command_line(toys):
    pruning = _pruning(
        "pruning.method.name=masked",
        "pruning.pattern.name=checkerboard",
        "pruning.pattern.options.offset=1",
    )
    assert pruning.pattern.options == CheckerboardOptions(offset=1)
    pruner = make_pruner(pruning)
    params = _params()
    masks = pruner.compute_masks(params, pruner.init_masks(params), 0.5, jax.random.key(0))
    rows, cols = np.indices((4, 6))
    np.testing.assert_array_equal(masks["w"], (rows + cols + 1) % 2 == 0)
    with pytest.raises(ValueError, match="offset: got 2; allowed: 0 or 1"):
        _pruning("pruning.pattern.name=checkerboard", "pruning.pattern.options.offset=2")


def test_toy_score_selected_by_config_keeps_the_smallest_weights(toys):
    pruner = make_pruner(
        _pruning(
            "pruning.method.name=masked",
            "pruning.score.name=smallest_first",
            "pruning.score.options.power=2.0",
        )
    )
    params = _params()
    masks = pruner.compute_masks(params, pruner.init_masks(params), 0.5, jax.random.key(0))
    w, m = np.abs(np.asarray(params["w"])), np.asarray(masks["w"])
    assert m.sum() == 12 and w[m].max() <= w[~m].min()


def test_toy_schedule_selected_by_config_drives_prune_optax(toys):
    pruning = _pruning(
        "pruning.method.name=masked",
        "pruning.schedule.name=staircase",
        "pruning.schedule.options.per_step=0.25",
        "pruning.target_sparsity=0.6",
    )
    assert pruning.first_prune_step() == 0
    optimizer = prune_optax(optax.sgd(0.0), make_pruner(pruning))
    params = _params()
    state = optimizer.init(params)
    pruned = []
    for _ in range(4):
        _, state = optimizer.update(jax.tree.map(jnp.zeros_like, params), state, params)
        pruned.append(int((~np.asarray(get_masks(state)["w"])).sum()))
    # round(sparsity * 24) pruned after steps 0, 1, 2, 3: sparsity 0.25, 0.5, 0.6, 0.6.
    assert pruned == [6, 12, 14, 14]


def test_toy_method_selected_by_config_trains_the_language_model(toys, data_dir):
    config = config_lib.load_config_file(ROOT / "configs" / "tiny.py")
    config = config_lib.apply_overrides(
        config,
        [
            f"data.data_dir={data_dir}",
            "model.num_layers=1",
            "pruning.method.name=first_row",
            "pruning.schedule.name=none",
            "pruning.param_regex=(^|/)ffn/(w_gate|w_up|w_down)$",
            "pruning.min_ndim=3",
        ],
    )
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, jax.devices()[:1])
    layout = state_lib.state_layout(config, mesh)
    state = state_lib.init_state(config, layout)
    step = make_train_step(layout, mesh)
    tokens = np.arange(8 * 33).reshape(8, 33).astype(np.int32) % 256
    batch = global_batch(mesh, {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    losses = []
    for _ in range(2):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    ffn = jax.device_get(state["params"])["blocks"][0]["ffn"]
    for name in ("w_gate", "w_up", "w_down"):
        # The record hook's masks, enforced by the optimizer: row 0 exactly zero, the rest
        # trained.
        assert np.all(ffn[name][:, 0, :] == 0) and np.count_nonzero(ffn[name][:, 1:, :]) > 0
    d_model, d_ff = ffn["w_gate"].shape[1], ffn["w_down"].shape[1]
    expected = (2 / d_model + 1 / d_ff) / 3
    np.testing.assert_allclose(float(metrics["pruning/sparsity"]), expected, rtol=1e-6)
