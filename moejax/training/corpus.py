"""A run's corpus from its `DataConfig`: the one place that turns the config's data fields into a
prepared dataset directory, a training iterator and validation batches (training, evaluation,
fitting parts of a trained model and the benchmarks all read the corpus this way)."""

from __future__ import annotations

from pathlib import Path

import grain

from moejax.config.groups import DataConfig
from moejax.data import pipeline, shakespeare


def resolve_data_dir(data_dir: str) -> Path:
    """`data_dir` as an absolute path (relative paths are taken from the current directory)."""
    return Path(data_dir).expanduser().absolute()


def prepared_data_dir(data: DataConfig) -> str:
    """The config's dataset directory, built there first if it is not yet (offline)."""
    data_dir = str(resolve_data_dir(data.data_dir))
    shakespeare.prepare(data_dir)
    return data_dir


def train_iterator(
    data: DataConfig, *, seed_offset: int = 0, num_workers: int | None = None
) -> grain.DatasetIterator:
    """Training batches of the config's shape, shuffled with `shuffle_seed + seed_offset`;
    `num_workers` None takes the config's."""
    return pipeline.make_train_iterator(
        prepared_data_dir(data),
        seq_len=data.seq_len,
        global_batch_size=data.global_batch_size,
        seed=data.shuffle_seed + seed_offset,
        num_workers=data.num_workers if num_workers is None else num_workers,
    )


def eval_batches(data: DataConfig, max_batches: int | None = None) -> list[pipeline.Batch]:
    """Validation batches of the config's shape: the first `max_batches` (None takes the
    config's `eval_batches`; 0 there, or here, means the whole split)."""
    limit = data.eval_batches if max_batches is None else max_batches
    return pipeline.make_eval_batches(
        prepared_data_dir(data),
        seq_len=data.seq_len,
        batch_size=data.eval_batch_size,
        max_batches=limit or None,
    )
