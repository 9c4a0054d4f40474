"""The training loop: data, steps, evaluation, metrics, checkpoints, preemption.

Reads like the algorithm: restore or initialise, then repeat {next batch, train step};
every `log_every` steps check the losses are finite and log them, every `eval_every`
evaluate, every `checkpoint_every` save (asynchronously). A stop request (SIGTERM or SIGINT, to
this process or, with several, to any of them) is read once per step boundary: that step is
saved and the save awaited before the run returns. The workdir is locked for the whole run
(`workdir.py`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm

from moejax import config as config_lib
from moejax import plotting
from moejax.config import Config
from moejax.parallel import distributed, sharding
from moejax.training import corpus
from moejax.training import state as state_lib
from moejax.training import workdir as workdir_lib
from moejax.training.checkpoint import Checkpointer
from moejax.training.evaluate import evaluate, expert_load_figure
from moejax.training.preemption import StopRequest
from moejax.training.pruning import layer_sparsity
from moejax.training.step import global_batch, make_eval_step, make_train_step
from moejax.training.writers import MetricsWriter

log = logging.getLogger(__name__)


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
    allow_config_change: bool = False,
    stop: StopRequest | None = None,
) -> TrainResult:
    """Trains `config` in `workdir`, resuming from its newest usable checkpoint if any.

    Everything that can refuse the run (the config, the workdir's recorded config, the data
    directory, another run holding the workdir) is checked before anything in the workdir is
    written. `stop` is a `StopRequest` the caller has already entered (to catch signals from its
    own start-up on); by default the run installs one for its duration.
    """
    devices = list(jax.devices() if devices is None else devices)
    workdir = Path(workdir).absolute()
    # With several processes each check below runs on every one, and one that fails stops them
    # all: the others would otherwise go on into the first collective and wait there.
    with distributed.Agreement("training start-up"):
        axis_sizes = config_lib.validate(config, len(devices))
        workdir_lib.check_resume(workdir, config, allow_config_change=allow_config_change)
        mesh = sharding.make_mesh(axis_sizes, devices)
        # A data_dir that cannot work (on any host) fails here, with the workdir untouched.
        eval_batches = corpus.eval_batches(
            config.data, block=sharding.process_batch_block(mesh, config.data.eval_batch_size)
        )
    with contextlib.ExitStack() as stack:
        if stop is None:
            stop = stack.enter_context(StopRequest())
        with distributed.Agreement("workdir lock"):
            # Process 0 holds the lock for the run; if it cannot, no process trains.
            if jax.process_index() == 0:
                stack.enter_context(workdir_lib.workdir_lock(workdir))
            # Again under the lock: a run that held it until now may have recorded its config.
            workdir_lib.check_resume(workdir, config, allow_config_change=allow_config_change)
        return _train_locked(config, workdir, mesh, axis_sizes, eval_batches, progress, stop)


def _train_locked(
    config: Config,
    workdir: Path,
    mesh: jax.sharding.Mesh,
    axis_sizes: dict[str, int],
    eval_batches: list,
    progress: bool,
    stop: StopRequest,
) -> TrainResult:
    train_cfg, data_cfg = config.train, config.data
    block = sharding.process_batch_block(mesh, data_cfg.global_batch_size)
    primary = jax.process_index() == 0
    layout = state_lib.state_layout(config, mesh)
    checkpointer = Checkpointer(
        workdir / workdir_lib.CHECKPOINT_DIR,
        keep=train_cfg.keep_checkpoints,
        async_save=train_cfg.async_checkpointing,
    )
    train_iter = None
    writer = None
    bar = None
    try:
        restored = checkpointer.restore_usable(
            layout.restore_target(),
            usable=lambda _, __, data_state: corpus.resumed_train_iterator(
                data_cfg, data_state, block=block
            ),
        )
        if restored is None:
            state = state_lib.init_state(config, layout)
            train_iter = corpus.train_iterator(data_cfg, block=block)
            restored_from = None
        else:
            restored_from, state, train_iter = restored.step, restored.state, restored.checked
            checkpointer.quarantine(sorted(restored.damaged))
            log.info("resumed from step %d", restored_from)
        step = int(jax.device_get(state["step"]))
        if primary:
            # The run is known to work from here on: only now does it become the workdir's record.
            workdir_lib.write_config(workdir, config)
            workdir_lib.trim_metrics(workdir, restored_from)

        train_step = make_train_step(layout, mesh)
        eval_step = make_eval_step(layout, mesh)
        writer = MetricsWriter(
            workdir,
            process_index=jax.process_index(),
            purge_step=None if restored_from is None else restored_from + 1,
        )
        log.info(
            "model: %d parameters; mesh %s on %d devices",
            state_lib.count_params(state["params"]),
            axis_sizes,
            mesh.size,
        )

        def run_eval(at_step: int) -> dict[str, Any]:
            variables = state_lib.model_variables(state)
            results = evaluate(eval_step, variables, eval_batches)
            if layout.pruning is not None:
                # Per-layer sparsity of the weights the model evaluates with; at eval time only,
                # since it reads every parameter back to the host.
                results.update(layer_sparsity(variables["params"], layout.pruning.prunable))
            writer.write(at_step, "eval", results)
            figure = expert_load_figure(results, at_step) if writer.enabled else None
            if figure is not None:
                writer.write_image(at_step, "eval/expert_load", plotting.figure_rgb(figure))
            return results

        tokens_per_step = data_cfg.global_batch_size * data_cfg.seq_len
        bar = tqdm(
            total=train_cfg.steps,
            initial=step,
            disable=not (progress and primary),
            unit="step",
            dynamic_ncols=True,
        )
        # One process speaks for the run; the others' lines would repeat it.
        say = bar.write if primary else lambda _: None
        pending: list[tuple[int, dict[str, Any]]] = []
        last_train: dict[str, float] = {}
        interval_start, interval_steps = time.perf_counter(), 0
        stopping = False
        # The untrained model's validation loss is the baseline every later one is read against.
        last_eval = None
        # `bits_per_byte` is per token: a byte, or a tokenizer's token.
        unit = "bits/token" if data_cfg.tokenizer else "bits/byte"
        if restored_from is None:
            last_eval = run_eval(step)
            say(f"step 0 (untrained): validation {last_eval['bits_per_byte']:.4f} {unit}")
        while step < train_cfg.steps and not stopping:
            batch = global_batch(mesh, next(train_iter))
            state, metrics = train_step(state, batch)
            step += 1
            interval_steps += 1
            pending.append((step, metrics))
            if len(pending) > 1:
                # At most one step queued behind the one running: with asynchronous dispatch the
                # loop would otherwise run up to log_every steps ahead of the device and sit in
                # the next device_get while a stop request waits for all of them.
                jax.block_until_ready(pending[-2][1]["loss"])
            # The one place a stop is read: a signal that lands after this line (in the logging,
            # evaluation or save below) is honoured at the next step boundary.
            stopping = stop.should_stop(step)
            due_log = step % train_cfg.log_every == 0 or step == train_cfg.steps
            due_eval = step % train_cfg.eval_every == 0 or step == train_cfg.steps
            due_save = step % train_cfg.checkpoint_every == 0 or step == train_cfg.steps
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
                say(
                    f"step {step}: validation loss {last_eval['loss']:.4f} nats, "
                    f"{last_eval['bits_per_byte']:.4f} {unit}" + _sparsity_text(last_eval)
                )
            if due_save or stopping:
                checkpointer.save(step, state, train_iter.get_state())
            if due_eval or due_save:
                # Evaluation and checkpoint time are not training throughput.
                interval_start = time.perf_counter()
        # Awaited here, with the stop handlers still installed: a second signal cannot cut it.
        checkpointer.wait()
        if stopping:
            if not checkpointer.is_committed(step):
                raise RuntimeError(
                    f"{stop.signal_name}: the checkpoint of step {step} is not on disk after "
                    f"its save returned ({checkpointer.directory})"
                )
            say(f"{stop.signal_name} received: checkpoint saved at step {step}")
    finally:
        if bar is not None:
            bar.close()
        if train_iter is not None:
            # Stops grain's worker processes, if any, before the interpreter tears down.
            train_iter.close()
        checkpointer.close()
        if writer is not None:
            writer.close()
    return TrainResult(
        step=step,
        stopped_by_signal=stop.signal_name if stopping else None,
        last_train_metrics=last_train,
        last_eval=last_eval,
        restored_from=restored_from,
    )
