"""Lottery tickets by iterative magnitude pruning, with the two controls of the paper.

*The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural Networks*: train; prune
`prune_rate` of the remaining weights of each layer by magnitude (the output layer at
`output_prune_rate`); rewind the survivors to their initial values; train again; repeat.
*Stabilizing the Lottery Ticket Hypothesis*: with `rewind_step > 0` survivors rewind to their
values after `rewind_step` updates of the dense run instead (late rewinding).
Controls at each round's sparsity: the ticket's masks with a fresh random initialisation
("reinit"), and random masks with the same per-layer sparsity at the original initialisation
("random"). Masks are held by `prune_optax`, which keeps pruned weights at zero during training.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moejax.models import small
from moejax.pruning import patterns
from moejax.pruning.masks import ParamFilter, apply_masks, path_name, prunable_tree
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
        if self.model not in small.MODELS:
            raise ValueError(f"model={self.model!r} is not allowed; allowed: {small.MODELS}.")
        for name in ("rounds", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1.")
        for name in ("prune_rate", "output_prune_rate"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)!r} must lie in (0, 1).")
        for name in ("rewind_step", "train_limit", "test_limit"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate!r} must be > 0.")
        self.seed_list()

    def seed_list(self) -> list[int]:
        try:
            seeds = [int(s) for s in self.seeds.split(",") if s.strip()]
        except ValueError as error:
            raise ValueError(f"seeds={self.seeds!r}: expected integers like '0,1,2'.") from error
        if not seeds or min(seeds) < 0:
            raise ValueError(f"seeds={self.seeds!r}: expected non-negative integers like '0,1'.")
        return seeds


def apply_overrides(config: LotteryConfig, overrides: list[str]) -> LotteryConfig:
    """`config` with `field=value` overrides (the `--config.field=value` flags) applied."""
    hints = typing.get_type_hints(LotteryConfig)
    changes: dict[str, Any] = {}
    for override in overrides:
        name, sep, text = override.partition("=")
        if not sep or name not in hints:
            raise ValueError(
                f"override {override!r}: expected field=value with field one of {list(hints)}."
            )
        changes[name] = hints[name](text)
    return dataclasses.replace(config, **changes)


def layer_rates(params: Any, prune_rate: float, output_prune_rate: float) -> dict[str, float]:
    """The fraction of each prunable layer's remaining weights removed per round."""
    names = [name for name, flag in _prunable_names(params) if flag]
    return {
        name: output_prune_rate if name.startswith(small.OUTPUT_LAYER + "/") else prune_rate
        for name in names
    }


def _prunable_names(params: Any) -> list[tuple[str, bool]]:
    flags = jax.tree_util.tree_leaves_with_path(prunable_tree(params, ParamFilter()))
    return [(path_name(path), flag) for path, flag in flags]


def magnitude_round(params: Any, masks: Any, rates: dict[str, float]) -> Any:
    """Prunes `rates[layer]` of each layer's surviving weights, smallest |w| first.

    params, masks: pure dicts like the model's params -> new bool masks (a subset of `masks`).
    """

    def prune(path, p, m):
        name = path_name(path)
        if name not in rates:
            return m
        remaining = int(np.sum(m))
        pruned_now = round(rates[name] * remaining)
        sparsity = (m.size - remaining + pruned_now) / m.size
        scores = patterns.masked_scores(jnp.abs(p), m)
        return patterns.unstructured_mask(scores, sparsity) & m

    return jax.tree_util.tree_map_with_path(prune, params, masks)


def random_like(masks: Any, key: jax.Array) -> Any:
    """Uniformly random masks with exactly the same number of kept weights per layer."""
    leaves, treedef = jax.tree.flatten(masks)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, m in zip(keys, leaves, strict=True):
        sparsity = 1.0 - float(np.sum(m)) / m.size
        out.append(patterns.unstructured_mask(jax.random.uniform(k, m.shape), sparsity))
    return jax.tree.unflatten(treedef, out)


def remaining_fraction(masks: Any, params: Any) -> float:
    """Kept fraction of the prunable weights (the kernels; biases are never pruned)."""
    flags = jax.tree.leaves(prunable_tree(params, ParamFilter()))
    kept = total = 0
    for m, flag in zip(jax.tree.leaves(masks), flags, strict=True):
        if flag:
            kept += int(np.sum(m))
            total += m.size
    return kept / total


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
    rates = layer_rates(init_params, config.prune_rate, config.output_prune_rate)
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
            masks = magnitude_round(trained, masks, rates)
    return records
