"""Tests for the grain training and evaluation pipelines."""

import itertools
import json
import pathlib

import chex
import grain
import numpy as np
import pytest

from moejax.data import pipeline, shakespeare

SEQ_LEN = 32
BATCH = 4


def _train_iterator(data_dir: pathlib.Path, **overrides) -> grain.DatasetIterator:
    kwargs = dict(
        seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0, process_index=0, process_count=1
    )
    return pipeline.make_train_iterator(data_dir, **(kwargs | overrides))


def _take(iterator, count: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(iterator, count))


def _assert_same_batches(expected: list[dict], actual: list[dict]) -> None:
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual, strict=True):
        assert want.keys() == got.keys() == {"inputs", "targets"}
        for key in want:
            np.testing.assert_array_equal(want[key], got[key])


def _rows(batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Recovers the packed rows: [num_batches * batch, seq_len + 1]."""
    return np.concatenate(
        [np.concatenate([b["inputs"][:, :1], b["targets"]], axis=1) for b in batches]
    )


def _json_round_trip(state: dict) -> dict:
    return json.loads(json.dumps(state))


def test_train_batches_have_shapes_dtypes_and_byte_values(data_dir: pathlib.Path) -> None:
    for batch in _take(_train_iterator(data_dir), 3):
        chex.assert_shape([batch["inputs"], batch["targets"]], (BATCH, SEQ_LEN))
        chex.assert_type([batch["inputs"], batch["targets"]], np.int32)
        assert batch["inputs"].min() >= 0 and batch["inputs"].max() < shakespeare.VOCAB_SIZE


def test_targets_are_inputs_shifted_by_one(data_dir: pathlib.Path) -> None:
    for batch in _take(_train_iterator(data_dir), 3):
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])


def test_rows_pack_the_document_stream_without_padding(data_dir: pathlib.Path) -> None:
    rows = _rows(_take(_train_iterator(data_dir, seq_len=255), 40))
    documents = pipeline.train_documents(data_dir, seed=0)
    stream, length = [], 0
    while length < rows.size:
        stream.append(documents[len(stream)]["bytes"])
        length += len(stream[-1])
    np.testing.assert_array_equal(rows.reshape(-1), np.concatenate(stream)[: rows.size])


def test_same_seed_gives_same_batches(data_dir: pathlib.Path) -> None:
    _assert_same_batches(
        _take(_train_iterator(data_dir, seed=7), 5), _take(_train_iterator(data_dir, seed=7), 5)
    )


def test_different_seeds_give_different_batches(data_dir: pathlib.Path) -> None:
    first = _take(_train_iterator(data_dir, seed=0), 2)
    second = _take(_train_iterator(data_dir, seed=1), 2)
    assert not np.array_equal(first[0]["inputs"], second[0]["inputs"])


def test_omitted_process_layout_comes_from_jax(data_dir: pathlib.Path) -> None:
    iterator = pipeline.make_train_iterator(
        data_dir, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0
    )
    chex.assert_shape(next(iterator)["inputs"], (BATCH, SEQ_LEN))


def _key(record: dict) -> tuple[bytes, int]:
    return record["play"], int(record["chunk_index"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_blocks_make_up_the_one_process_batches(
    data_dir: pathlib.Path, process_count: int
) -> None:
    # The global batches must not depend on the process layout: a 2-process run and a
    # 1-process run of one config see the same data in the same order.
    single = _take(_train_iterator(data_dir, global_batch_size=8), 5)
    per_process = [
        _take(
            _train_iterator(
                data_dir, global_batch_size=8, process_index=p, process_count=process_count
            ),
            5,
        )
        for p in range(process_count)
    ]
    for step, expected in enumerate(single):
        blocks = [batches[step] for batches in per_process]
        chex.assert_shape([b["inputs"] for b in blocks], (8 // process_count, SEQ_LEN))
        joined = {key: np.concatenate([b[key] for b in blocks]) for key in expected}
        _assert_same_batches([expected], [joined])


def test_iterator_state_is_the_same_for_every_process_layout(data_dir: pathlib.Path) -> None:
    # Only one process writes the data state into a checkpoint; every process, and a resume on
    # another process count, must be able to continue from it.
    iterators = [
        _train_iterator(data_dir, global_batch_size=8, process_index=p, process_count=2)
        for p in range(2)
    ]
    for iterator in iterators:
        _take(iterator, 3)
    states = [_json_round_trip(iterator.get_state()) for iterator in iterators]
    assert states[0] == states[1]
    single = _train_iterator(data_dir, global_batch_size=8)
    _take(single, 3)
    assert _json_round_trip(single.get_state()) == states[0]
    expected = _take(single, 4)
    resumed = _train_iterator(data_dir, global_batch_size=8)
    resumed.set_state(states[1])
    _assert_same_batches(expected, _take(resumed, 4))
    second = _train_iterator(data_dir, global_batch_size=8, process_index=1, process_count=2)
    second.set_state(states[0])
    _assert_same_batches(
        [{key: batch[key][4:] for key in batch} for batch in expected], _take(second, 4)
    )


def test_every_epoch_is_a_new_permutation(data_dir: pathlib.Path) -> None:
    docs = pipeline.train_documents(data_dir, seed=0)
    size = len(shakespeare.data_source(data_dir, "train"))
    epochs = [[_key(record) for record in docs[e * size : (e + 1) * size]] for e in range(3)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(epochs[2])
    assert len(set(epochs[0])) == size
    assert epochs[0] != epochs[1] != epochs[2]


@pytest.mark.parametrize("consumed", [0, 1, 6])
def test_resume_from_json_state_reproduces_batches(data_dir: pathlib.Path, consumed: int) -> None:
    uninterrupted = _train_iterator(data_dir, seed=3)
    _take(uninterrupted, consumed)
    state = _json_round_trip(uninterrupted.get_state())
    expected = _take(uninterrupted, 6)

    resumed = _train_iterator(data_dir, seed=3)
    resumed.set_state(state)
    _assert_same_batches(expected, _take(resumed, 6))


def test_one_worker_process_gives_the_same_resumable_batches(data_dir: pathlib.Path) -> None:
    expected = _take(_train_iterator(data_dir), 8)
    with_worker = _train_iterator(data_dir, num_workers=1)
    try:
        _assert_same_batches(expected[:3], _take(with_worker, 3))
        state = _json_round_trip(with_worker.get_state())
        _take(with_worker, 2)
        with_worker.set_state(state)
        _assert_same_batches(expected[3:], _take(with_worker, 5))
    finally:
        with_worker.close()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(seq_len=0), "seq_len"),
        (dict(global_batch_size=0), "global_batch_size"),
        (dict(global_batch_size=6, process_count=4), "global_batch_size=6"),
        (dict(process_index=2, process_count=2), "process_index"),
        (dict(process_count=0), "process_count"),
        (dict(num_workers=-1), "num_workers"),
        (dict(seed=-1), "seed"),
    ],
)
def test_train_iterator_rejects_invalid_arguments(
    data_dir: pathlib.Path, overrides: dict, field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        _train_iterator(data_dir, **overrides)


def test_eval_batches_are_consecutive_validation_rows(data_dir: pathlib.Path) -> None:
    batches = pipeline.make_eval_batches(
        data_dir, seq_len=SEQ_LEN, batch_size=BATCH, process_index=0, process_count=1
    )
    source = shakespeare.data_source(data_dir, "validation")
    text = np.concatenate([source[i]["bytes"] for i in range(len(source))])
    assert len(batches) == len(text) // (SEQ_LEN + 1) // BATCH
    for batch in batches:
        chex.assert_shape([batch["inputs"], batch["targets"]], (BATCH, SEQ_LEN))
        chex.assert_type([batch["inputs"], batch["targets"]], np.int32)
    rows = _rows(batches)
    np.testing.assert_array_equal(rows.reshape(-1), text[: rows.size])


def test_eval_batches_are_deterministic_and_capped(data_dir: pathlib.Path) -> None:
    kwargs = dict(seq_len=SEQ_LEN, batch_size=BATCH, process_index=0, process_count=1)
    every_batch = pipeline.make_eval_batches(data_dir, **kwargs)
    _assert_same_batches(every_batch, pipeline.make_eval_batches(data_dir, **kwargs))
    _assert_same_batches(
        every_batch[:3], pipeline.make_eval_batches(data_dir, max_batches=3, **kwargs)
    )


def test_eval_process_shards_together_give_the_single_process_batches(
    data_dir: pathlib.Path,
) -> None:
    single = pipeline.make_eval_batches(
        data_dir, seq_len=SEQ_LEN, batch_size=8, process_index=0, process_count=1
    )
    shards = [
        pipeline.make_eval_batches(
            data_dir, seq_len=SEQ_LEN, batch_size=8, process_index=i, process_count=2
        )
        for i in range(2)
    ]
    merged = [
        {key: np.concatenate([a[key], b[key]]) for key in a} for a, b in zip(*shards, strict=True)
    ]
    _assert_same_batches(single, merged)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(seq_len=-1), "seq_len"),
        (dict(batch_size=6, process_count=4), "batch_size=6"),
        (dict(batch_size=100_000), "batch_size=100000"),
        (dict(max_batches=0), "max_batches"),
    ],
)
def test_eval_batches_reject_invalid_arguments(
    data_dir: pathlib.Path, overrides: dict, field: str
) -> None:
    kwargs = dict(seq_len=SEQ_LEN, batch_size=BATCH, process_index=0, process_count=1)
    with pytest.raises(ValueError, match=field):
        pipeline.make_eval_batches(data_dir, **(kwargs | overrides))
