"""The lottery-ticket experiment (`python train.py --config configs/lottery_fmnist.py`):
Fashion-MNIST through TFDS and grain, every seed and arm, and the results as `results.json`,
`results.md` and `accuracy_vs_weights.png` in the workdir.

*The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural Networks*: train; prune
`prune_rate` of the remaining weights of each layer by magnitude (the output layer at
`output_prune_rate`); rewind the survivors to their initial values; train again; repeat.
*Stabilizing the Lottery Ticket Hypothesis*: with `rewind_step > 0` survivors rewind to their
values after `rewind_step` updates of the dense run instead (late rewinding).
Controls at each round's sparsity: the ticket's masks with a fresh random initialisation
("reinit"), and random masks with the same per-layer sparsity at the original initialisation
("random"). Masks are held by `prune_optax`, which keeps pruned weights at zero during training.

A program, so it lives in `tasks/`; a round is the "lottery" pruning method's `refine`
(`moejax.pruning.lottery`). Overrides (`--config.epochs=3`) go through the language model's
parser (`moejax.config.apply_overrides`), so they parse and fail the same way.
A config file selects it by declaring `TASK = "lottery"` (see `train.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moejax import config as config_lib
from moejax import plotting, stats
from moejax.data import fashion_mnist
from moejax.errors import ConfigError, require_config, require_one_of
from moejax.models import small
from moejax.pruning.base import get_method
from moejax.pruning.lottery import LotteryOptions, random_like, remaining_fraction
from moejax.pruning.masks import apply_masks
from moejax.pruning.optax_wrapper import Pruner, find_prune_state, prune_optax

ARMS = ("ticket", "reinit", "random")


@dataclasses.dataclass(frozen=True)
class LotteryConfig:
    """One lottery-ticket experiment (`python train.py --config configs/lottery_fmnist.py`).

    rounds: pruning rounds after the dense run; epochs: training epochs per round (fixed, no
    early stopping); train_limit / test_limit: use only the first records (0: all); seeds:
    comma-separated seeds, each a full repetition.
    """

    model: str = "lenet"
    rounds: int = 8
    prune_rate: float = 0.2
    output_prune_rate: float = 0.1
    epochs: int = 5
    batch_size: int = 128
    learning_rate: float = 1.2e-3
    rewind_step: int = 0
    seeds: str = "0"
    train_limit: int = 0
    test_limit: int = 0
    data_dir: str = "data/tfds"

    def __post_init__(self) -> None:
        require_one_of("model", self.model, small.MODELS)
        for name in ("rounds", "epochs", "batch_size"):
            value = getattr(self, name)
            require_config(value >= 1, name, value, ">= 1")
        for name in ("train_limit", "test_limit"):
            value = getattr(self, name)
            require_config(value >= 0, name, value, ">= 0")
        require_config(self.learning_rate > 0, "learning_rate", self.learning_rate, "> 0")
        try:
            self.method_options()
        except ValueError as error:  # the method's own check, named by this config's field
            raise ConfigError(str(error)) from None
        self.seed_list()

    def method_options(self) -> LotteryOptions:
        """The options of the "lottery" pruning method these fields set."""
        return LotteryOptions(
            prune_rate=self.prune_rate,
            output_prune_rate=self.output_prune_rate,
            output_layer=small.OUTPUT_LAYER,
            rewind_step=self.rewind_step,
        )

    def seed_list(self) -> list[int]:
        try:
            seeds = [int(s) for s in self.seeds.split(",") if s.strip()]
        except ValueError:
            seeds = []
        require_config(
            bool(seeds) and min(seeds) >= 0,
            "seeds",
            self.seeds,
            "comma-separated non-negative integers like '0,1,2'",
        )
        return seeds


def apply_overrides(config: LotteryConfig, overrides: list[str]) -> LotteryConfig:
    """`config` with `field=value` overrides (the `--config.field=value` flags) applied by the
    language model's parser (`moejax.config.apply_overrides`): values parsed by field type
    (`false` is False), an unknown field a `ConfigError` listing the allowed ones."""
    return config_lib.apply_overrides(config, overrides)


@dataclasses.dataclass
class Trainer:
    """Trains a masked copy of one model architecture on in-memory data, jitted per epoch."""

    graphdef: nnx.GraphDef
    images: jax.Array  # [n, 28, 28, 1]
    labels: jax.Array  # [n]
    test_images: jax.Array
    test_labels: jax.Array
    config: LotteryConfig

    def __post_init__(self) -> None:
        pruner = Pruner(rewind_step=self.config.rewind_step)
        self.optimizer = prune_optax(optax.adam(self.config.learning_rate), pruner)
        self._epoch = jax.jit(self._train_epoch)
        self._accuracy = jax.jit(self._test_accuracy)

    def _loss(self, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return small.cross_entropy(nnx.merge(self.graphdef, params)(x), y)

    def _train_epoch(self, params, opt_state, images, labels, key):
        steps = images.shape[0] // self.config.batch_size
        order = jax.random.permutation(key, images.shape[0])[: steps * self.config.batch_size]
        order = order.reshape(steps, self.config.batch_size)  # [steps, batch]

        def step(carry, index):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(self._loss)(params, images[index], labels[index])
            updates, opt_state = self.optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), order)
        return params, opt_state, jnp.mean(losses)

    def _test_accuracy(self, params, images, labels):
        logits = nnx.merge(self.graphdef, params)(images)
        return jnp.mean(jnp.argmax(logits, axis=-1) == labels)

    def train(self, params: Any, masks: Any, key: jax.Array) -> tuple[Any, Any, dict]:
        """Trains `apply_masks(params, masks)` for `epochs`; returns (params, opt state,
        {"test_accuracy", "train_loss"})."""
        params = apply_masks(params, masks)
        opt_state = self.optimizer.init(params)
        opt_state = opt_state._replace(masks=masks)
        loss = jnp.nan
        for epoch in range(self.config.epochs):
            params, opt_state, loss = self._epoch(
                params, opt_state, self.images, self.labels, jax.random.fold_in(key, epoch)
            )
        accuracy = self._accuracy(params, self.test_images, self.test_labels)
        return params, opt_state, {"test_accuracy": float(accuracy), "train_loss": float(loss)}


def run_seed(
    config: LotteryConfig,
    data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    seed: int,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """All arms and rounds for one seed; one record per trained network:
    {"arm", "round", "remaining", "test_accuracy", "train_loss", "seed"}."""
    key = jax.random.key(seed)
    init_key, reinit_key, random_key, data_key = jax.random.split(key, 4)
    model = small.make_model(config.model, init_key)
    graphdef, state = nnx.split(model)
    init_params = nnx.to_pure_dict(state)
    trainer = Trainer(graphdef, *map(jnp.asarray, data), config)
    method, options = get_method("lottery"), config.method_options()
    masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool), init_params)
    rewind_point = init_params
    records = []

    def record(arm: str, round_index: int, masks: Any, metrics: dict) -> None:
        remaining = remaining_fraction(masks, init_params)
        records.append(
            {"arm": arm, "round": round_index, "remaining": remaining, "seed": seed, **metrics}
        )
        log(
            f"seed {seed} round {round_index} {arm:>6}: {100 * remaining:6.2f}% weights, "
            f"test accuracy {metrics['test_accuracy']:.4f}"
        )

    for round_index in range(config.rounds + 1):
        round_key = jax.random.fold_in(data_key, round_index)
        trained, opt_state, metrics = trainer.train(rewind_point, masks, round_key)
        record("ticket", round_index, masks, metrics)
        if round_index == 0:
            # The rewind point is the dense run's weights after `rewind_step` updates (the
            # initial weights when it is 0), stored by the optimizer wrapper.
            rewind_point = find_prune_state(opt_state).rewind_params
        if round_index > 0:
            fresh = nnx.to_pure_dict(
                nnx.state(
                    small.make_model(config.model, jax.random.fold_in(reinit_key, round_index))
                )
            )
            record("reinit", round_index, masks, trainer.train(fresh, masks, round_key)[2])
            shuffled = random_like(masks, jax.random.fold_in(random_key, round_index))
            record(
                "random", round_index, shuffled, trainer.train(rewind_point, shuffled, round_key)[2]
            )
        if round_index < config.rounds:
            masks = method.refine(trained, masks, prunable=None, options=options)
    return records


COLORS = {"ticket": (31, 119, 180), "reinit": (255, 127, 14), "random": (120, 120, 120)}


def load_data(config: LotteryConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels), building the dataset if needed."""
    data_dir = pathlib.Path(config.data_dir).expanduser().absolute()
    fashion_mnist.prepare(data_dir)
    train = fashion_mnist.load_arrays(data_dir, "train", config.train_limit or None)
    test = fashion_mnist.load_arrays(data_dir, "test", config.test_limit or None)
    return (*train, *test)


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (round, arm): remaining fraction, mean and sample standard deviation
    (`ddof=1`; None for one seed) of test accuracy over seeds."""
    rows = []
    rounds = sorted({r["round"] for r in records})
    for round_index in rounds:
        for arm in ARMS:
            group = [r for r in records if r["round"] == round_index and r["arm"] == arm]
            if not group:
                continue
            accuracy = np.array([r["test_accuracy"] for r in group])
            rows.append(
                {
                    "round": round_index,
                    "arm": arm,
                    "remaining": float(np.mean([r["remaining"] for r in group])),
                    "accuracy_mean": float(accuracy.mean()),
                    "accuracy_std": stats.sample_std(accuracy),
                    "seeds": len(group),
                }
            )
    return rows


def _markdown(config: LotteryConfig, rows: list[dict[str, Any]], seconds: float) -> str:
    dense = next(r for r in rows if r["round"] == 0 and r["arm"] == "ticket")
    lines = [
        f"# Lottery tickets: {config.model} on Fashion-MNIST",
        "",
        f"{config.rounds} rounds pruning {100 * config.prune_rate:g}% of each layer's remaining "
        f"weights (output layer {100 * config.output_prune_rate:g}%), {config.epochs} epochs "
        f"per round, Adam lr {config.learning_rate:g}, batch {config.batch_size}, rewind to "
        f"step {config.rewind_step}, seeds {config.seeds}; {seconds:.0f} s in all.",
        "Test accuracy (mean ± sample std, ddof=1, over seeds) after the last epoch of each "
        "round; `remaining` counts the weight matrices (biases are never pruned).",
        "",
        "| round | remaining % | ticket | reinit | random |",
        "|---:|---:|---:|---:|---:|",
    ]
    by_round: dict[int, dict[str, dict]] = {}
    for row in rows:
        by_round.setdefault(row["round"], {})[row["arm"]] = row
    for round_index, arms in sorted(by_round.items()):
        cells = [
            stats.format_spread(arms[a]["accuracy_mean"], arms[a]["accuracy_std"], 2, scale=100)
            if a in arms
            else "—"
            for a in ARMS
        ]
        remaining = 100 * arms["ticket"]["remaining"]
        lines.append(f"| {round_index} | {remaining:.1f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Claim: tickets at 10-20% of the weights are within 1 point of the dense "
        f"network ({100 * dense['accuracy_mean']:.2f}%) and beat random re-initialisation.",
    ]
    for _, arms in sorted(by_round.items()):
        remaining = arms["ticket"]["remaining"]
        if 0.10 <= remaining <= 0.20 and "reinit" in arms:
            gap = 100 * (arms["ticket"]["accuracy_mean"] - dense["accuracy_mean"])
            margin = 100 * (arms["ticket"]["accuracy_mean"] - arms["reinit"]["accuracy_mean"])
            verdict = "holds" if gap >= -1.0 and margin > 0 else "does not hold"
            lines.append(
                f"- {100 * remaining:.1f}% weights: ticket - dense = {gap:+.2f} points, "
                f"ticket - reinit = {margin:+.2f} points: {verdict}."
            )
    lines += [
        "",
        "`accuracy_vs_weights.png`: test accuracy against pruning round (weights remaining = "
        "0.8^round of the hidden layers), one line per arm (blue = ticket, orange = random "
        "re-init, grey = random pruning), mean over seeds.",
    ]
    return "\n".join(lines) + "\n"


def write_results(
    config: LotteryConfig, records: list[dict], workdir: pathlib.Path, seconds: float
) -> dict[str, Any]:
    """Writes results.json, results.md and the PNG; returns the JSON content."""
    workdir.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    content = {"config": dataclasses.asdict(config), "summary": rows, "runs": records}
    (workdir / "results.json").write_text(json.dumps(content, indent=2))
    (workdir / "results.md").write_text(_markdown(config, rows, seconds))
    curves = {
        arm: [[r["round"], r["accuracy_mean"]] for r in rows if r["arm"] == arm] for arm in ARMS
    }
    dense = [[0, r["accuracy_mean"]] for r in rows if r["round"] == 0 and r["arm"] == "ticket"]
    for arm in ("reinit", "random"):
        curves[arm] = dense + curves[arm]
    figure = plotting.curves_figure(
        curves,
        title="Lottery tickets on Fashion-MNIST (mean over seeds)",
        xlabel="pruning round (weights remaining: 0.8^round of the hidden layers)",
        ylabel="test accuracy",
        colors=COLORS,
    )
    plotting.save_png(figure, workdir / "accuracy_vs_weights.png")
    return content


def run_experiment(
    config: LotteryConfig, workdir: pathlib.Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Runs every seed and writes the results into `workdir`."""
    start = time.perf_counter()
    data = load_data(config)
    log(f"data: {len(data[1])} train / {len(data[3])} test images")
    records = []
    for seed in config.seed_list():
        records += run_seed(config, data, seed, log)
    seconds = time.perf_counter() - start
    content = write_results(config, records, workdir, seconds)
    if not all(math.isfinite(r["test_accuracy"]) for r in records):
        raise FloatingPointError("a lottery run ended with a non-finite accuracy")
    return content
