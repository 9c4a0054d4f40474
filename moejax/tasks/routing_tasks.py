"""Several small sequence tasks told apart by a task token: the multi-task proxy on which RoMA's
router-only fine-tuning (`moejax.tasks.roma`) is measured.

A sequence is `task x_1 .. x_n SEP y_1 .. y_n`: the task token names what maps the content
`x` (symbols `0 .. num_symbols - 1`) to the answer `y` (`TASKS`: copy it, reverse it, add one
to each symbol modulo `num_symbols`). The model reads the sequence shifted by one and is scored
on the answer positions, teacher-forced; a sample is answered correctly when all `n` answer
symbols are. The tasks share the content distribution, so only the task token says which map
to apply, and a MoE model is free to route the tasks to different experts.

`roma_comparison` is the experiment: train a tiny MoE `TransformerLM` briefly on all tasks,
then fine-tune only its routers on a held-out split without and with the manifold regulariser,
and measure answer accuracy on a test split. `benchmarks/roma.py` runs the long version.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import numpy as np
import optax
from flax import nnx

from moejax.config import ModelConfig, MoEConfig
from moejax.errors import require
from moejax.models.transformer import TransformerLM
from moejax.tasks import roma

# Task name -> the answer `[batch, n]` of the content `x [batch, n]` over `num_symbols` symbols.
TASKS: Mapping[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "copy": lambda x, num_symbols: x,
    "reverse": lambda x, num_symbols: x[:, ::-1],
    "increment": lambda x, num_symbols: (x + 1) % num_symbols,
}


@dataclasses.dataclass(frozen=True)
class RoutingTasksConfig:
    """`length` content symbols over `num_symbols`, for each task of `tasks` (names in
    `TASKS`). Token ids: symbols `0 .. num_symbols - 1`, then SEP, then one token per task."""

    num_symbols: int = 8
    length: int = 6
    tasks: tuple[str, ...] = ("copy", "reverse", "increment")

    def __post_init__(self) -> None:
        require(self.num_symbols >= 2, "num_symbols", self.num_symbols, "an int >= 2")
        require(self.length >= 1, "length", self.length, "an int >= 1")
        unknown = [name for name in self.tasks if name not in TASKS]
        require(bool(self.tasks) and not unknown, "tasks", self.tasks, ", ".join(TASKS))

    @property
    def separator(self) -> int:
        return self.num_symbols

    @property
    def vocab_size(self) -> int:
        return self.num_symbols + 1 + len(self.tasks)

    @property
    def seq_len(self) -> int:
        """Model input length: the `2 * length + 2` tokens of a sequence, less the last."""
        return 2 * self.length + 1


def routing_tasks_batch(
    config: RoutingTasksConfig, batch: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """One batch, tasks drawn uniformly.

    Returns:
      inputs, targets: [batch, seq_len] int32 (targets are the inputs shifted by one);
      loss_mask: [batch, seq_len] bool, True where the target is an answer symbol;
      prompt_mask: [batch, seq_len] bool, True at the task token and the content;
      task: [batch] int32, the index of the sample's task in `config.tasks`.
    """
    c = config
    task = rng.integers(0, len(c.tasks), batch)
    x = rng.integers(0, c.num_symbols, (batch, c.length))
    y = np.empty_like(x)
    for index, name in enumerate(c.tasks):
        rows = task == index
        y[rows] = TASKS[name](x[rows], c.num_symbols)
    sequence = np.concatenate(
        [(c.num_symbols + 1 + task)[:, None], x, np.full((batch, 1), c.separator), y], axis=1
    )
    positions = np.arange(c.seq_len)
    return {
        "inputs": sequence[:, :-1].astype(np.int32),
        "targets": sequence[:, 1:].astype(np.int32),
        "loss_mask": np.broadcast_to(positions >= c.length + 1, (batch, c.seq_len)).copy(),
        "prompt_mask": np.broadcast_to(positions <= c.length, (batch, c.seq_len)).copy(),
        "task": task.astype(np.int32),
    }


def routing_tasks_model(config: RoutingTasksConfig, *, seed: int = 0) -> TransformerLM:
    """A tiny MoE LM for the tasks: 2 layers of width 32, 4 experts of width 32, top-2."""
    model_config = ModelConfig(
        vocab_size=config.vocab_size,
        d_model=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        d_ff=64,
        max_seq_len=config.seq_len,
        moe=MoEConfig(num_experts=4, top_k=2, expert_d_ff=32),
    )
    return TransformerLM(model_config, rngs=nnx.Rngs(seed))


def train_lm(
    model: TransformerLM,
    config: RoutingTasksConfig,
    *,
    steps: int,
    batch: int = 64,
    learning_rate: float = 3e-3,
    seed: int = 0,
) -> None:
    """Trains every parameter of `model` in place on fresh batches of the tasks: Adam on the
    answer cross-entropy plus the MoE layers' auxiliary (load-balance) losses."""
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, inputs, targets, loss_mask):
        def loss_fn(model):
            logits, aux = model(inputs, train=True)
            balance = sum(a["aux_loss"] for a in aux if a is not None)
            return roma.answer_loss(logits, targets, loss_mask) + balance

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        b = routing_tasks_batch(config, batch, rng)
        step(model, optimizer, b["inputs"], b["targets"], b["loss_mask"])


@nnx.jit
def _correct(model: TransformerLM, inputs, targets, loss_mask) -> jax.Array:
    logits, _ = model(inputs, train=False)
    return roma.answer_correct(logits, targets, loss_mask)


def task_accuracy(model: TransformerLM, batches: list[dict]) -> dict[str, float]:
    """Share of samples of `batches` answered correctly (all answer symbols), overall
    ("all") and per task index ("task0", ...)."""
    correct = np.concatenate(
        [np.asarray(_correct(model, b["inputs"], b["targets"], b["loss_mask"])) for b in batches]
    )
    task = np.concatenate([b["task"] for b in batches])
    result = {"all": float(np.mean(correct))}
    for index in np.unique(task):
        result[f"task{index}"] = float(np.mean(correct[task == index]))
    return result
