"""Byte-level language-model batches from the Shakespeare dataset, built with grain.

Training: the train records → seeded shuffle, reshuffled every epoch, repeated forever →
concatenate-then-split packing into rows of `seq_len + 1` bytes (rows may span documents; no
padding) → `inputs = row[:-1]`, `targets = row[1:]` → global batches of `global_batch_size`
rows → this process's contiguous block of `global_batch_size // process_count` rows → optional
worker processes. Every process walks the same global stream and keeps its block, so the global
batches, and the iterator state a checkpoint saves, are the same whatever the number of
processes: a run resumed on another process count (or compared with a one-process run) sees the
same data in the same order. The cost is that each process packs whole global batches, a few
bytes per token of host work, against a step that costs millions of FLOPs per token.

Evaluation: the validation split in file order, cut into consecutive rows of `seq_len + 1`
bytes; every process evaluates its block of each global batch, so the union over processes is
the same whatever the process count.
"""

import json
import pathlib
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from moejax.data import shakespeare

Batch = dict[str, np.ndarray]


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}.")


def _check_process_layout(process_index: int, process_count: int) -> None:
    _check_positive("process_count", process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, process_count={process_count}), got {process_index}."
        )


def _local_batch_size(batch_field: str, batch_size: int, process_count: int) -> int:
    """Returns the rows each process gets of a global batch of `batch_size` rows."""
    _check_positive(batch_field, batch_size)
    if batch_size % process_count:
        raise ValueError(
            f"{batch_field}={batch_size} must be divisible by process_count={process_count}."
        )
    return batch_size // process_count


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    return (
        jax.process_index() if process_index is None else process_index,
        jax.process_count() if process_count is None else process_count,
    )


def train_documents(data_dir: str | pathlib.Path, *, seed: int) -> grain.MapDataset:
    """Returns the train records, shuffled per epoch and repeated forever.

    Epoch `e` is the slice `[e * n, (e + 1) * n)` of the result, a permutation of the `n`
    records that differs from epoch to epoch. Every process reads the same sequence.
    """
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}.")
    records = grain.MapDataset.source(shakespeare.data_source(data_dir, "train"))
    # `.seed()` hashes the seed. An explicit `shuffle(seed)` would shuffle epoch e with seed + e,
    # so runs with seeds s and s + 1 would see the same orders one epoch apart.
    return records.seed(seed).shuffle().repeat()


def _document_bytes(record: dict[str, Any]) -> dict[str, np.ndarray]:
    return {"row": record["bytes"]}


def tokenizer_file(path: str | pathlib.Path) -> pathlib.Path | None:
    """The tokenizer.json `path` names (the file, or a directory holding one), or None."""
    path = pathlib.Path(path)
    candidate = path / "tokenizer.json" if path.is_dir() else path
    return candidate if candidate.is_file() else None


class DocumentTokens:
    """A record's bytes -> its token ids `{"row": int32 [n]}` by a tokenizer.json (the
    `tokenizers` library), decoded as UTF-8; no special tokens are added. Picklable: grain
    workers load the tokenizer themselves."""

    def __init__(self, path: str | pathlib.Path):
        file = tokenizer_file(path)
        if file is None:
            raise ValueError(f"tokenizer: {str(path)!r} is no tokenizer.json nor a dir holding one")
        self.file = str(file)
        self._tokenizer = None

    def __getstate__(self) -> dict[str, Any]:
        return {"file": self.file, "_tokenizer": None}

    def ids(self, data: bytes) -> np.ndarray:
        if self._tokenizer is None:
            import tokenizers

            self._tokenizer = tokenizers.Tokenizer.from_file(self.file)
        text = bytes(data).decode("utf-8", errors="replace")
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        return {"row": self.ids(record["bytes"])}


def _shift_row(packed: dict[str, np.ndarray]) -> Batch:
    row = packed["row"].astype(np.int32)  # [seq_len + 1]
    return {"inputs": row[:-1], "targets": row[1:]}


class _ProcessBlock:
    """This process's rows `[index * rows, (index + 1) * rows)` of a global batch."""

    def __init__(self, process_index: int, local_rows: int):
        self._start, self._stop = process_index * local_rows, (process_index + 1) * local_rows

    def __call__(self, batch: Batch) -> Batch:
        return {name: value[self._start : self._stop] for name, value in batch.items()}


class _JsonStateIterator(grain.DatasetIterator):
    """Passes elements through unchanged; its state survives `json.loads(json.dumps(state))`.

    Grain's concat-then-split state holds `(start, stop)` tuples and compares them with `(-1, -1)`
    to mean "no partial document". JSON turns them into lists, and a restored `[-1, -1]` is then
    taken for a partial document, which silently changes every later batch.
    """

    def __next__(self) -> Batch:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        # The round trip also fails here, not at restore time, if a state is not JSON.
        return json.loads(json.dumps(self._parent.get_state()))

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(_slices_as_tuples(state))


def _slices_as_tuples(state: Any) -> Any:
    if isinstance(state, dict):
        return {
            key: (
                {name: tuple(sl) for name, sl in value.items()}
                if key == "remainder_slices"
                else _slices_as_tuples(value)
            )
            for key, value in state.items()
        }
    if isinstance(state, list):
        return [_slices_as_tuples(value) for value in state]
    return state


def make_train_iterator(
    data_dir: str | pathlib.Path,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    num_workers: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    tokenizer: str = "",
) -> grain.DatasetIterator:
    """Returns an endless iterator of packed training batches for this process.

    Each batch is `{"inputs": int32 [local_batch, seq_len], "targets": int32 [local_batch,
    seq_len]}` with `local_batch = global_batch_size // process_count`, byte values in [0, 256)
    and `targets[:, t] == inputs[:, t + 1]` for `t < seq_len - 1`.

    Process `p`'s batch is rows `[p * local_batch, (p + 1) * local_batch)` of the global batch a
    single process would get, so the global batches do not depend on `process_count`.

    `get_state()` returns plain JSON (save it with orbax `JsonSave`), the same on every process
    and for every `process_count`; `set_state()` on an iterator built with the same data
    arguments (any process layout) resumes with exactly the batches the saved one would have
    given next. The state's layout depends on `num_workers`, and so do the batches when
    `num_workers > 1`, since each worker packs its own slice of the document stream.

    Args:
      data_dir: where `shakespeare.prepare` built the dataset.
      seq_len: tokens per row; each row packs `seq_len + 1` bytes.
      global_batch_size: rows per step summed over all processes.
      seed: shuffle seed, a non-negative integer.
      num_workers: worker processes that build batches; 0 builds them in this process.
      process_index: this process; defaults to `jax.process_index()`.
      process_count: all processes; defaults to `jax.process_count()`.
      tokenizer: a tokenizer.json (or a directory holding one): rows pack each document's token
        ids instead of its bytes; "" packs bytes.
    """
    _check_positive("seq_len", seq_len)
    if num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative integer, got {num_workers}.")
    process_index, process_count = _process_layout(process_index, process_count)
    _check_process_layout(process_index, process_count)
    local_batch = _local_batch_size("global_batch_size", global_batch_size, process_count)
    documents = train_documents(data_dir, seed=seed)
    rows = grain.experimental.ConcatThenSplitIterDataset(
        documents.map(DocumentTokens(tokenizer) if tokenizer else _document_bytes).to_iter_dataset(),
        length_struct={"row": seq_len + 1},
    )
    batches = rows.map(_shift_row).batch(global_batch_size, drop_remainder=True)
    if process_count > 1:
        batches = batches.map(_ProcessBlock(process_index, local_batch))
    if num_workers:
        if not flags.FLAGS.is_parsed():
            # Starting a worker reads grain's absl flags, which raises in programs that did not
            # parse flags through absl.app.
            flags.FLAGS.mark_as_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return _JsonStateIterator(iter(batches))


def make_eval_batches(
    data_dir: str | pathlib.Path,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    tokenizer: str = "",
) -> list[Batch]:
    """Returns this process's share of the validation batches, the same on every call.

    The validation records are concatenated in file order and cut into consecutive,
    non-overlapping rows of `seq_len + 1` bytes; rows that do not fill a last global batch are
    dropped. Global batch `b` holds rows `[b * batch_size, (b + 1) * batch_size)`, and process `p`
    gets its contiguous block of `batch_size // process_count` of them, so the batches of all
    processes together are those of a single process.

    Args:
      data_dir: where `shakespeare.prepare` built the dataset.
      seq_len: tokens per row; each row holds `seq_len + 1` bytes.
      batch_size: rows per global batch, summed over all processes.
      max_batches: keep at most this many batches (the first ones); None keeps all.
      process_index: this process; defaults to `jax.process_index()`.
      process_count: all processes; defaults to `jax.process_count()`.
      tokenizer: as for `make_train_iterator`: rows of token ids instead of bytes.

    Returns:
      A list of `{"inputs": int32 [local_batch, seq_len], "targets": int32 [local_batch,
      seq_len]}`.
    """
    _check_positive("seq_len", seq_len)
    if max_batches is not None:
        _check_positive("max_batches", max_batches)
    process_index, process_count = _process_layout(process_index, process_count)
    _check_process_layout(process_index, process_count)
    local_batch = _local_batch_size("batch_size", batch_size, process_count)
    source = shakespeare.data_source(data_dir, "validation")
    read = DocumentTokens(tokenizer).ids if tokenizer else (lambda data: data)
    text = np.concatenate([read(source[i]["bytes"]) for i in range(len(source))])  # [tokens]
    num_rows = len(text) // (seq_len + 1)
    num_batches = num_rows // batch_size
    if num_batches == 0:
        raise ValueError(
            f"batch_size={batch_size} rows of seq_len + 1 = {seq_len + 1} bytes exceed the"
            f" validation split ({len(text)} bytes, {num_rows} rows)."
        )
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    rows = text[: num_batches * batch_size * (seq_len + 1)].astype(np.int32)
    rows = rows.reshape(num_batches, process_count, local_batch, seq_len + 1)
    local_rows = rows[:, process_index]  # [num_batches, local_batch, seq_len + 1]
    return [{"inputs": batch[:, :-1], "targets": batch[:, 1:]} for batch in local_rows]
