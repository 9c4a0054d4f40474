"""The lottery-ticket experiment (`moejax.tasks.lottery`): rewinding, its config's overrides
and checks, and a tiny run through train.py."""

import dataclasses
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import ConfigError
from moejax.models import small
from moejax.pruning import apply_masks, lottery
from moejax.tasks import lottery as lottery_task

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("rewind_step", [0, 3])
def test_rewinding_restores_exactly_the_survivors_values_at_the_rewind_step(rewind_step):
    rng = np.random.default_rng(0)
    data = (
        rng.random((64, 28, 28, 1), np.float32),
        rng.integers(0, 10, 64).astype(np.int32),
        rng.random((16, 28, 28, 1), np.float32),
        rng.integers(0, 10, 16).astype(np.int32),
    )
    config = lottery_task.LotteryConfig(epochs=1, batch_size=8, rewind_step=rewind_step)
    model = small.make_model("lenet", jax.random.key(1))
    graphdef, state = nnx.split(model)
    init = nnx.to_pure_dict(state)
    trainer = lottery_task.Trainer(graphdef, *map(jnp.asarray, data), config)
    masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool), init)
    trained, opt_state, _ = trainer.train(init, masks, jax.random.key(2))
    point = opt_state.rewind_params
    if rewind_step == 0:
        want = init
    else:
        # Replay the first `rewind_step` updates by hand to get the expected weights.
        params, replay = init, trainer.optimizer.init(init)
        grad_fn = jax.jit(jax.grad(trainer._loss))
        order = jax.random.permutation(jax.random.fold_in(jax.random.key(2), 0), 64)
        for step in range(rewind_step):
            index = order[step * 8 : (step + 1) * 8]
            grads = grad_fn(params, data[0][index], data[1][index])
            updates, replay = trainer.optimizer.update(grads, replay, params)
            params = jax.tree.map(lambda p, u: p + u, params, updates)
        want = params
    for a, b in zip(jax.tree.leaves(point), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    new_masks = lottery.magnitude_round(trained, masks, {"fc1/kernel": 0.2, "out/kernel": 0.1})
    rewound = apply_masks(point, new_masks)
    for r, p, m in zip(
        jax.tree.leaves(rewound), jax.tree.leaves(point), jax.tree.leaves(new_masks), strict=True
    ):
        r, p, m = np.asarray(r), np.asarray(p), np.asarray(m)
        assert np.array_equal(r[m], p[m]) and np.all(r[~m] == 0)


def test_overrides_parse_by_field_type_and_reject_unknown_fields():
    config = lottery_task.apply_overrides(
        lottery_task.LotteryConfig(), ["epochs=2", "prune_rate=0.3"]
    )
    assert config.epochs == 2 and config.prune_rate == 0.3
    with pytest.raises(ConfigError, match="unknown field 'epoch'; allowed fields of config"):
        lottery_task.apply_overrides(config, ["epoch=2"])
    with pytest.raises(ConfigError, match=r"prune_rate: got 1.5; allowed: in \(0, 1\)"):
        lottery_task.apply_overrides(config, ["prune_rate=1.5"])
    with pytest.raises(ConfigError, match="epochs: value 'two' is not a valid int"):
        lottery_task.apply_overrides(config, ["epochs=two"])


@dataclasses.dataclass(frozen=True)
class _FlaggedConfig(lottery_task.LotteryConfig):
    flag: bool = True


@pytest.mark.parametrize("text, value", [("false", False), ("False", False), ("true", True)])
def test_overrides_read_booleans_as_the_language_model_parser_does(text, value):
    # The shared parser: `bool("false")` would be True.
    config = lottery_task.apply_overrides(_FlaggedConfig(), [f"flag={text}"])
    assert config.flag is value


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"model": "vgg"}, "model: got 'vgg'; allowed: "),
        ({"rounds": 0}, "rounds: got 0; allowed: >= 1"),
        ({"test_limit": -1}, "test_limit: got -1; allowed: >= 0"),
        ({"learning_rate": 0.0}, "learning_rate: got 0.0; allowed: > 0"),
        ({"output_prune_rate": 1.0}, "output_prune_rate: got 1.0; allowed: in (0, 1)"),
        ({"rewind_step": -1}, "rewind_step: got -1; allowed: >= 0"),
        ({"seeds": "0,-1"}, "seeds: got '0,-1'; allowed: comma-separated"),
    ],
)
def test_config_checks_name_field_value_and_what_is_allowed(fields, message):
    with pytest.raises(ConfigError) as error:
        lottery_task.LotteryConfig(**fields)
    assert str(error.value).startswith(message)


def test_tiny_lottery_run_through_train_py(fmnist_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("moejax_train_cli_lottery", ROOT / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    workdir = tmp_path / "run"
    status = train.main(
        [
            "--config", str(ROOT / "configs/lottery_fmnist.py"), "--workdir", str(workdir),
            "--config.rounds=2", "--config.epochs=1", "--config.batch_size=50",
            "--config.train_limit=1000", "--config.test_limit=500",
            f"--config.data_dir={fmnist_dir}",
        ]
    )  # fmt: skip
    assert status == 0
    results = json.loads((workdir / "results.json").read_text())
    arms = [(row["round"], row["arm"]) for row in results["summary"]]
    assert arms == [(0, "ticket")] + [(r, a) for r in (1, 2) for a in lottery_task.ARMS]
    remaining = [row["remaining"] for row in results["summary"] if row["arm"] == "ticket"]
    assert remaining[0] == 1.0 and 0.79 < remaining[1] < 0.81 and 0.63 < remaining[2] < 0.65
    assert all(0.3 < row["accuracy_mean"] <= 1.0 for row in results["summary"])
    assert (workdir / "results.md").read_text().startswith("# Lottery tickets: lenet")
    assert (workdir / "accuracy_vs_weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
