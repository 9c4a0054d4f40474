"""Train and evaluate the MQAR model for one attention kind: recall accuracy at query
positions and routing recall (share of queries whose last-layer visited blocks, in any head,
hold the value token of their pair)."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moejax.sparse_attention import AttentionConfig
from moejax.tasks.mqar import MQARConfig, mqar_batch
from moejax.tasks.mqar_model import RecallModel


@dataclasses.dataclass(frozen=True)
class MQARTrainConfig:
    """One MQAR run's optimisation and model size. The language model's runs are configured by
    `moejax.config.TrainConfig` and `ModelConfig`; this task trains its own small
    `RecallModel` in its own loop (batch size, model width and a length curriculum, no
    checkpoints or schedules to share), so its settings are a group of their own.

    The first `curriculum_steps` of the `steps` train on sequences of `curriculum_length`
    tokens (batch doubled): the recall circuit forms quickly on short sequences and then
    carries over to the full length, which is what is evaluated."""

    steps: int = 1500
    batch: int = 32
    learning_rate: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    d_model: int = 64
    num_heads: int = 2
    num_layers: int = 2
    eval_batches: int = 4
    seed: int = 0
    curriculum_steps: int = 0
    curriculum_length: int = 128
    log_every: int = 0  # print step, loss and batch accuracy this often (0: never)


def masked_loss(logits: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and accuracy over query positions. `logits [b, t, vocab]`."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    count = jnp.maximum(mask.sum(), 1.0)
    return (nll * mask).sum() / count, (correct * mask).sum() / count


def routing_recall(
    block_mask: jax.Array, batch: dict, block_q: int, block_kv: int, key_shift: int = 0
) -> jax.Array:
    """Share of query positions whose value token lies in a visited block of some head.

    `block_mask [batch or 1, heads or 1, q_blocks, kv_blocks]`; `key_shift` slots by which
    the layer moved its keys (1 for shared-QK routing, whose slot j holds token j - 1)."""
    b = batch["inputs"].shape[0]
    mask = jnp.broadcast_to(jnp.any(block_mask, axis=1), (b,) + block_mask.shape[2:])
    positions = jnp.arange(batch["inputs"].shape[1])
    value_position = jnp.maximum(batch["pair_position"] + 1 + key_shift, 0)
    hit = mask[jnp.arange(b)[:, None], positions // block_q, value_position // block_kv]
    query = batch["loss_mask"]
    return jnp.sum(hit & query) / jnp.maximum(jnp.sum(query), 1)


def train_mqar(task: MQARConfig, attention: AttentionConfig, config: MQARTrainConfig) -> dict:
    """Trains from scratch; returns final accuracy, routing recall, density, loss and timing."""
    model = RecallModel(
        task.vocab_size,
        config.d_model,
        config.num_heads,
        config.num_layers,
        attention,
        rngs=nnx.Rngs(config.seed),
    )
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        config.learning_rate,
        min(config.warmup, config.steps // 2),
        config.steps,
        config.learning_rate * 0.05,
    )
    optimizer = nnx.Optimizer(
        model, optax.adamw(schedule, weight_decay=config.weight_decay), wrt=nnx.Param
    )

    @nnx.jit
    def step(model, optimizer, batch):
        def loss_fn(model):
            logits, _ = model(batch["inputs"], train=True)
            return masked_loss(logits, batch)

        (loss, accuracy), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return loss, accuracy

    capture = nnx.capture(lambda m, x: m(x, train=False, capture=True), nnx.Intermediate)

    @nnx.jit
    def evaluate(model, batch):
        (logits, metrics), sown = capture(model, batch["inputs"])
        loss, accuracy = masked_loss(logits, batch)
        last = nnx.to_pure_dict(sown)["blocks"][len(model.blocks) - 1]["attention"]
        shift = int(attention.shares_qk)
        recall = routing_recall(
            last["block_mask"][0], batch, attention.block_q, attention.block_size, shift
        )
        density = jnp.mean(jnp.stack([m["attention_density"] for m in metrics]))
        return {"loss": loss, "accuracy": accuracy, "routing_recall": recall, "density": density}

    rng = np.random.default_rng(config.seed)
    start = time.perf_counter()
    history = []
    short_task = dataclasses.replace(task, length=config.curriculum_length)
    for i in range(config.steps):
        if i < config.curriculum_steps:
            batch = mqar_batch(short_task, 2 * config.batch, rng)
        else:
            batch = mqar_batch(task, config.batch, rng)
        loss, accuracy = step(model, optimizer, batch)
        if (i + 1) % max(config.steps // 10, 1) == 0:
            history.append((i + 1, float(loss), float(accuracy)))
        if config.log_every and (i + 1) % config.log_every == 0:
            print(
                f"  step {i + 1} loss {float(loss):.3f} accuracy {float(accuracy):.3f}", flush=True
            )
    train_seconds = time.perf_counter() - start
    eval_rng = np.random.default_rng(10_000 + config.seed)
    results = [
        evaluate(model, mqar_batch(task, config.batch, eval_rng))
        for _ in range(config.eval_batches)
    ]
    summary = {key: float(np.mean([r[key] for r in results])) for key in results[0]}
    return {**summary, "train_seconds": train_seconds, "history": history}
