"""A run's corpus from its `DataConfig`: the one place that turns the config's data fields into a
prepared dataset directory, a training iterator and validation batches (training, evaluation,
fitting parts of a trained model and the benchmarks all read the corpus this way)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain

from moejax.config.groups import DataConfig
from moejax.data import pipeline, shakespeare
from moejax.errors import ConfigError


def resolve_data_dir(data_dir: str) -> Path:
    """`data_dir` as an absolute path (relative paths are taken from the current directory)."""
    return Path(data_dir).expanduser().absolute()


def prepared_data_dir(data: DataConfig) -> str:
    """The config's dataset directory, built there first if it is not yet (offline).

    A path that is not a directory, or one that cannot be written where the dataset is still to
    be built, is a `ConfigError` naming `data.data_dir`.
    """
    path = resolve_data_dir(data.data_dir)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(
            f"data.data_dir={data.data_dir!r}: {existing} is a file, not a directory; give the "
            "directory that holds (or will hold) the prepared dataset"
        )
    try:
        shakespeare.prepare(str(path))
    except OSError as error:
        raise ConfigError(
            f"data.data_dir={data.data_dir!r}: cannot build the dataset there "
            f"({error.strerror or error}); give a writable directory, or one where it is built"
        ) from None
    return str(path)


# (index, count): this process's block of each global batch, as `sharding.process_batch_block`
# gives it; None takes block `jax.process_index()` of `jax.process_count()`.
Block = tuple[int, int] | None


def train_iterator(
    data: DataConfig,
    *,
    seed_offset: int = 0,
    num_workers: int | None = None,
    block: Block = None,
) -> grain.DatasetIterator:
    """This process's block of the training batches of the config's shape, shuffled with
    `shuffle_seed + seed_offset`; `num_workers` None takes the config's."""
    index, count = block if block is not None else (None, None)
    return pipeline.make_train_iterator(
        prepared_data_dir(data),
        seq_len=data.seq_len,
        global_batch_size=data.global_batch_size,
        seed=data.shuffle_seed + seed_offset,
        num_workers=data.num_workers if num_workers is None else num_workers,
        process_index=index,
        process_count=count,
        tokenizer=data.tokenizer,
    )


def eval_batches(
    data: DataConfig, max_batches: int | None = None, *, block: Block = None
) -> list[pipeline.Batch]:
    """This process's block of the validation batches of the config's shape: the first
    `max_batches` (None takes the config's `eval_batches`; 0 there, or here, means the whole
    split)."""
    limit = data.eval_batches if max_batches is None else max_batches
    index, count = block if block is not None else (None, None)
    return pipeline.make_eval_batches(
        prepared_data_dir(data),
        seq_len=data.seq_len,
        batch_size=data.eval_batch_size,
        max_batches=limit or None,
        process_index=index,
        process_count=count,
        tokenizer=data.tokenizer,
    )


def resumed_train_iterator(
    data: DataConfig, data_state: Any, *, block: Block = None
) -> grain.DatasetIterator:
    """`train_iterator(data, block=block)` moved to the checkpointed `data_state` (saved by any
    process layout); a state that does not apply to it (damaged, or saved by another data
    layout) is a ValueError saying why."""
    iterator = train_iterator(data, block=block)
    try:
        if not isinstance(data_state, dict) or not data_state:
            raise TypeError(f"expected the saved iterator state, got {data_state!r:.80}")
        iterator.set_state(data_state)
    except Exception as error:  # noqa: BLE001 - grain raises many kinds for a foreign state
        iterator.close()
        raise ValueError(
            f"its data-iterator state does not apply ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''})"
        ) from None
    return iterator
