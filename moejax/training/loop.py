"""The training loop: data, steps, evaluation, metrics, checkpoints, preemption.

Reads like the algorithm: restore or initialise, then repeat {next batch, train step};
every `log_every` steps check the losses are finite and log them, every `eval_every`
evaluate, every `checkpoint_every` save (asynchronously). SIGTERM / SIGINT finish the
current step, save, and return.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm

from moejax import config as config_lib
from moejax import evaluation, sharding
from moejax.config import Config
from moejax.pruning.lm import layer_sparsity
from moejax.training import corpus
from moejax.training import state as state_lib
from moejax.training.checkpoint import Checkpointer
from moejax.training.step import global_batch, make_eval_step, make_train_step
from moejax.training.writers import MetricsWriter

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm stopped being finite; nothing after the last good
    checkpoint was saved."""


@dataclasses.dataclass
class TrainResult:
    step: int
    stopped_by_signal: str | None
    last_train_metrics: dict[str, float]
    last_eval: dict[str, Any] | None
    restored_from: int | None


class _StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            # Outside the main thread signals stay with the caller.
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def prepare_workdir(workdir: Path, config: Config) -> None:
    """Writes config.json; refuses a workdir that holds a run of a different model."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / CONFIG_FILE
    if path.exists():
        saved = config_lib.load_json(path)
        if saved.model != config.model:
            raise config_lib.ConfigError(
                f"--workdir {workdir}: holds a run of a different model "
                f"(saved {saved.model}, requested {config.model}); use a new --workdir"
            )
    if jax.process_index() == 0:
        config_lib.save_json(config, path)


def _sparsity_text(results: dict[str, Any]) -> str:
    if "sparsity/prunable" not in results:
        return ""
    return (
        f", sparsity {results['sparsity/prunable']:.3f} of the pruned weights "
        f"({results['sparsity/total']:.3f} of all)"
    )


def _check_finite(pending: list[tuple[int, dict[str, Any]]]) -> None:
    for step, metrics in pending:
        loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise NonFiniteLossError(
                f"training stopped: loss={loss}, grad_norm={grad_norm} at step {step}; "
                "the checkpoints on disk are from before this step and were not overwritten. "
                "Lower train.learning_rate or raise train.warmup_steps and resume."
            )


def train(
    config: Config,
    workdir: str | Path,
    *,
    devices: Sequence[jax.Device] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Trains `config` in `workdir`, resuming from its latest good checkpoint if any."""
    devices = list(jax.devices() if devices is None else devices)
    axis_sizes = config_lib.validate(config, len(devices))
    workdir = Path(workdir).absolute()
    prepare_workdir(workdir, config)
    mesh = sharding.make_mesh(axis_sizes, devices)
    train_cfg, data_cfg = config.train, config.data

    layout = state_lib.state_layout(config, mesh)

    train_iter = corpus.train_iterator(data_cfg)
    eval_batches = corpus.eval_batches(data_cfg)

    checkpointer = Checkpointer(
        workdir / CHECKPOINT_DIR,
        keep=train_cfg.keep_checkpoints,
        async_save=train_cfg.async_checkpointing,
    )
    restored = checkpointer.restore_latest_good(layout.restore_target())
    if restored is None:
        state = state_lib.init_state(config, layout)
        restored_from = None
    else:
        restored_from, state, data_state, damaged = restored
        checkpointer.quarantine(damaged)
        train_iter.set_state(data_state)
        log.info("resumed from step %d", restored_from)
    step = int(jax.device_get(state["step"]))

    train_step = make_train_step(layout, mesh)
    eval_step = make_eval_step(layout, mesh)
    writer = MetricsWriter(workdir, process_index=jax.process_index())
    log.info(
        "model: %d parameters; mesh %s on %d devices",
        state_lib.count_params(state["params"]),
        axis_sizes,
        len(devices),
    )

    def run_eval(at_step: int) -> dict[str, Any]:
        variables = state_lib.model_variables(state)
        results = evaluation.evaluate(eval_step, variables, eval_batches)
        if layout.pruning is not None:
            # Per-layer sparsity of the weights the model evaluates with; at eval time only,
            # since it reads every parameter back to the host.
            results.update(layer_sparsity(variables["params"], layout.pruning.prunable))
        writer.write(at_step, "eval", results)
        return results

    def save(at_step: int) -> None:
        checkpointer.save(at_step, state, train_iter.get_state())

    tokens_per_step = data_cfg.global_batch_size * data_cfg.seq_len
    bar = tqdm(
        total=train_cfg.steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True
    )
    pending: list[tuple[int, dict[str, Any]]] = []
    last_train: dict[str, float] = {}
    interval_start, interval_steps = time.perf_counter(), 0
    try:
        # The untrained model's validation loss is the baseline every later one is read against.
        last_eval = None
        if restored_from is None:
            last_eval = run_eval(step)
            bar.write(f"step 0 (untrained): validation {last_eval['bits_per_byte']:.4f} bits/byte")
        with _StopRequest() as stop:
            while step < train_cfg.steps and stop.signal_name is None:
                batch = global_batch(mesh, next(train_iter))
                state, metrics = train_step(state, batch)
                step += 1
                interval_steps += 1
                pending.append((step, metrics))
                due_log = step % train_cfg.log_every == 0 or step == train_cfg.steps
                due_eval = step % train_cfg.eval_every == 0 or step == train_cfg.steps
                due_save = step % train_cfg.checkpoint_every == 0 or step == train_cfg.steps
                stopping = stop.signal_name is not None
                if due_log or due_eval or due_save or stopping:
                    pending = jax.device_get(pending)
                    _check_finite(pending)
                    elapsed = time.perf_counter() - interval_start
                    tokens_per_second = interval_steps * tokens_per_step / max(elapsed, 1e-9)
                    loss_mean = sum(float(m["loss"]) for _, m in pending) / len(pending)
                    last_train = writer.write(
                        step,
                        "train",
                        {
                            **pending[-1][1],
                            "loss_mean": loss_mean,
                            "tokens_per_second": tokens_per_second,
                        },
                    )
                    bar.set_postfix(loss=f"{loss_mean:.3f}", tok_s=f"{tokens_per_second:,.0f}")
                    bar.update(interval_steps)
                    pending, interval_steps = [], 0
                    interval_start = time.perf_counter()
                if due_eval:
                    last_eval = run_eval(step)
                    bar.write(
                        f"step {step}: validation loss {last_eval['loss']:.4f} nats, "
                        f"{last_eval['bits_per_byte']:.4f} bits/byte" + _sparsity_text(last_eval)
                    )
                if due_save or stopping:
                    save(step)
                if due_eval or due_save:
                    # Evaluation and checkpoint time are not training throughput.
                    interval_start = time.perf_counter()
            if stop.signal_name is not None:
                bar.write(f"{stop.signal_name} received: checkpoint saved at step {step}")
    finally:
        bar.close()
        # Stops grain's worker processes, if any, before the interpreter tears down.
        train_iter.close()
        checkpointer.close()
        writer.close()
    return TrainResult(
        step=step,
        stopped_by_signal=stop.signal_name,
        last_train_metrics=last_train,
        last_eval=last_eval,
        restored_from=restored_from,
    )
