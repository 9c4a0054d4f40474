"""A trained run's weights in a model that adds fresh parts to it: layer routers fitted on a
frozen language model (Dr.LLM), Flux attention routers, and the like.

`read_run` and `restore_checkpoint` are how every reader of a finished or running run (eval,
these fitting drivers, benchmarks) finds its config and newest usable checkpoint, read-only;
`restore_run` reads the run's config and newest usable checkpoint onto one device;
`load_trained` copies those weights into a model built with extra parameters, checking that
everything else matches the checkpoint exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from moejax import config as config_lib
from moejax.parallel import sharding
from moejax.routers.base import RouterState
from moejax.training import corpus
from moejax.training import state as state_lib
from moejax.training import workdir as workdir_lib
from moejax.training.checkpoint import Checkpointer, CheckpointError, Restored
from moejax.training.workdir import WorkdirError


def read_run(workdir: str | Path) -> config_lib.Config:
    """The recorded config of the training run in `workdir`; `WorkdirError` if it is none."""
    workdir = Path(workdir).absolute()
    if not workdir.is_dir():
        what = "is not a directory" if workdir.exists() else "no such directory"
        raise WorkdirError(f"--workdir {workdir}: {what}; give a training run's workdir")
    config = workdir_lib.read_run_config(workdir)
    if config is None:
        raise WorkdirError(
            f"--workdir {workdir}: holds no {workdir_lib.CONFIG_FILE}; is it a training run?"
        )
    return config


def iterator_state_applies(run_config: config_lib.Config) -> Callable[[int, Any, Any], None]:
    """The check that makes a checkpoint usable beyond reading: its data-iterator state applies
    to the run's training iterator (what a resume would need), whoever reads it."""

    def check(step: int, state: Any, data_state: Any) -> None:
        corpus.resumed_train_iterator(run_config.data, data_state).close()

    return check


def restore_checkpoint(
    workdir: str | Path,
    run_config: config_lib.Config,
    abstract_state: Any,
    *,
    step: int | None = None,
    before: int | None = None,
    asked_as: str = "--step",
) -> Restored | None:
    """Reads (never writes) the usable checkpoint of the run in `workdir` that
    `Checkpointer.restore_usable` picks. No checkpoint at all is a `CheckpointError`; none
    before `before` is None."""
    directory = Path(workdir).absolute() / workdir_lib.CHECKPOINT_DIR
    if not directory.is_dir():
        raise CheckpointError(f"--workdir: no checkpoint in {directory}")
    checkpointer = Checkpointer(
        directory, keep=run_config.train.keep_checkpoints, async_save=False, read_only=True
    )
    try:
        restored = checkpointer.restore_usable(
            abstract_state,
            step=step,
            before=before,
            usable=iterator_state_applies(run_config),
            asked_as=asked_as,
        )
    finally:
        checkpointer.close()
    if restored is None and before is None:
        raise CheckpointError(f"--workdir: no checkpoint in {directory}")
    return restored


def restore_run(workdir: str | Path) -> tuple[config_lib.Config, int, dict[str, Any]]:
    """(config, step, model variables {"params", "router_state"} as pure dicts) of the run in
    `workdir` at its newest usable checkpoint, on this process's first device."""
    config = read_run(workdir)
    devices = jax.devices()[:1]
    mesh = sharding.make_mesh(config_lib.validate(config, len(devices)), devices)
    layout = state_lib.state_layout(config, mesh)
    restored = restore_checkpoint(workdir, config, layout.restore_target())
    return config, restored.step, jax.device_get(state_lib.model_variables(restored.state))


def _paths(tree: Any) -> set[tuple]:
    return {path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_trained(model: nnx.Module, variables: dict[str, Any], fresh: nnx.filterlib.Filter) -> None:
    """Copies a run's `variables` ({"params", "router_state"} pure dicts) into `model` in place.

    The parameters `fresh` selects keep their initial values; every other parameter must be in
    the checkpoint and the checkpoint must hold nothing else, so a model that differs from the
    run in more than the fresh parts is refused instead of half-loaded.
    """
    params = nnx.state(model, nnx.Param)
    expected = nnx.to_pure_dict(nnx.state(model, nnx.All(nnx.Param, nnx.Not(fresh))))
    missing = sorted(map(str, _paths(expected) - _paths(variables["params"])))
    extra = sorted(map(str, _paths(variables["params"]) - _paths(expected)))
    if missing or extra:
        raise ValueError(
            "the checkpoint's parameters do not match the model: "
            f"missing from the checkpoint {missing[:5]}, not in the model {extra[:5]}"
        )
    nnx.replace_by_pure_dict(params, variables["params"])
    nnx.update(model, params)
    if variables.get("router_state"):
        router_state = nnx.state(model, RouterState)
        nnx.replace_by_pure_dict(router_state, variables["router_state"])
        nnx.update(model, router_state)


def run_batches(
    config: config_lib.Config, *, train_batches: int, eval_batches: int, shuffle_offset: int = 0
) -> tuple[list[dict], list[dict]]:
    """The run's corpus as (the first `train_batches` training batches, shuffled with the run's
    seed plus `shuffle_offset`; `eval_batches` validation batches, 0 for the whole split), to fit
    new parts of a trained model."""
    train_iter = corpus.train_iterator(config.data, seed_offset=shuffle_offset, num_workers=0)
    train = list(itertools.islice(train_iter, train_batches))
    return train, corpus.eval_batches(config.data, eval_batches)
