"""Fashion-MNIST from local gzipped IDX files, as a TFDS dataset (array_record, no TensorFlow),
and grain input functions for it.

The files come from the Debian package `dataset-fashion-mnist` (`/usr/share/datasets/
fashion-mnist`), or from the project-local copy that `scripts/setup.sh` unpacks without root
(`data/debian/usr/share/datasets/fashion-mnist`); `$MOEJAX_FASHION_MNIST_DIR` overrides both.
Each file is checked against the size and sha256 of its decompressed IDX bytes, so a recompressed
copy of the same data passes and a truncated or different file fails before anything is written.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

DATASET_NAME = "fashion_mnist_local"
NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
SPLITS = ("train", "test")
SOURCE_DIR_ENV = "MOEJAX_FASHION_MNIST_DIR"
SYSTEM_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
LOCAL_DIR = (
    pathlib.Path(__file__).resolve().parents[2] / "data/debian" / SYSTEM_DIR.relative_to("/")
)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# (sha256, size) of the decompressed IDX bytes of the official release.
EXPECTED: dict[str, tuple[str, int]] = {
    "train-images-idx3-ubyte.gz": (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        47040016,
    ),
    "train-labels-idx1-ubyte.gz": (
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        60008,
    ),
    "t10k-images-idx3-ubyte.gz": (
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        7840016,
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        10008,
    ),
}

_log = logging.getLogger(__name__)


def source_dir() -> pathlib.Path:
    """The first directory holding all four files: $MOEJAX_FASHION_MNIST_DIR, the system
    package's directory, then the project-local copy."""
    candidates = [SYSTEM_DIR, LOCAL_DIR]
    if os.environ.get(SOURCE_DIR_ENV):
        candidates.insert(0, pathlib.Path(os.environ[SOURCE_DIR_ENV]))
    names = [name for pair in FILES.values() for name in pair]
    for candidate in candidates:
        if all((candidate / name).is_file() for name in names):
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST gz files not found in {[str(c) for c in candidates]}; run "
        "`bash scripts/setup.sh` (installs or unpacks the Debian package dataset-fashion-mnist)"
        f" or set ${SOURCE_DIR_ENV}."
    )


def read_idx(path: pathlib.Path, expected: tuple[str, int] | None) -> np.ndarray:
    """Decompresses and parses one IDX file (uint8 data) after checking (sha256, size).

    Returns uint8 [count, 28, 28] for images, [count] for labels.
    """
    raw = gzip.decompress(path.read_bytes())
    if expected is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if (digest, len(raw)) != tuple(expected):
            raise ValueError(
                f"{path}: decompressed sha256/size {digest}/{len(raw)} differ from the expected "
                f"{expected[0]}/{expected[1]}."
            )
    magic = int.from_bytes(raw[:4], "big")
    if magic >> 8 != 0x08:
        raise ValueError(f"{path}: IDX magic {magic:#010x} is not uint8 data (0x000008nn).")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {data.size} bytes of data for dims {dims}.")
    return data.reshape(dims)


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST (Zalando): 60k train / 10k test 28x28 grey images in 10 classes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "From the gz IDX files of the Debian package."}
    url_infos = None  # Nothing is downloaded; see IambicShakespeare.

    def __init__(
        self,
        *,
        source: str | pathlib.Path | None = None,
        expected: Mapping[str, tuple[str, int]] | None = None,
        **kwargs: Any,
    ) -> None:
        self._source = source
        self._expected = EXPECTED if expected is None else expected
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(
                        shape=IMAGE_SHAPE, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
                    ),
                    "label": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager
        directory = pathlib.Path(self._source) if self._source else source_dir()
        return {split: self._generate_examples(directory, split) for split in SPLITS}

    def _generate_examples(self, directory: pathlib.Path, split: str) -> Iterator[tuple[int, dict]]:
        image_file, label_file = FILES[split]
        images = read_idx(directory / image_file, self._expected.get(image_file))
        labels = read_idx(directory / label_file, self._expected.get(label_file))
        if images.shape[1:] != IMAGE_SHAPE or len(images) != len(labels):
            raise ValueError(f"{directory}: images {images.shape} and labels {labels.shape}.")
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            yield index, {"image": image, "label": int(label)}


def builder(
    data_dir: str | pathlib.Path,
    source: str | pathlib.Path | None = None,
    expected: Mapping[str, tuple[str, int]] | None = None,
) -> FashionMnistLocal:
    """The builder under `data_dir`; `source`/`expected` override where the gz files are and
    their (sha256, size) (tests build tiny fakes through the same code)."""
    return FashionMnistLocal(
        data_dir=str(data_dir), file_format="array_record", source=source, expected=expected
    )


def prepare(data_dir: str | pathlib.Path, **builder_kwargs: Any) -> None:
    """Builds the dataset under `data_dir` unless it is there already. Works offline."""
    dataset_builder = builder(data_dir, **builder_kwargs)
    try:
        dataset_builder.download_and_prepare()
    except OSError:
        if not builder(data_dir).is_prepared():
            raise
        _log.info("Dataset %s was built concurrently under %s.", DATASET_NAME, data_dir)


def data_source(data_dir: str | pathlib.Path, split: str) -> Sequence[dict[str, Any]]:
    """Random access to a split: records `{"image": uint8 [28, 28], "label": int}`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    dataset_builder = builder(data_dir)
    if not dataset_builder.is_prepared():
        raise FileNotFoundError(
            f"No {DATASET_NAME} dataset under {data_dir}; call prepare({str(data_dir)!r}) first."
        )
    return dataset_builder.as_data_source(split=split)


def _to_arrays(record: dict[str, Any]) -> dict[str, np.ndarray]:
    image = record["image"].astype(np.float32)[..., None] / 255.0  # [28, 28, 1]
    return {"image": image, "label": np.int32(record["label"])}


def make_batches(
    data_dir: str | pathlib.Path,
    split: str,
    *,
    batch_size: int,
    seed: int | None = None,
    num_epochs: int = 1,
    limit: int | None = None,
) -> grain.MapDataset:
    """A grain dataset of batches `{"image": float32 [batch, 28, 28, 1] in [0, 1], "label":
    int32 [batch]}`: the first `limit` records (all if None), shuffled per epoch when `seed`
    is set, `num_epochs` times; training batches drop the remainder, evaluation keeps it."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if num_epochs <= 0:
        raise ValueError(f"num_epochs must be positive, got {num_epochs}.")
    records = grain.MapDataset.source(data_source(data_dir, split))
    if limit is not None:
        records = records[:limit]
    if seed is not None:
        records = records.seed(seed).shuffle()
    records = records.repeat(num_epochs).map(_to_arrays)
    return records.batch(batch_size, drop_remainder=seed is not None)


def load_arrays(
    data_dir: str | pathlib.Path, split: str, limit: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A whole split in memory through the grain pipeline: (images float32 [n, 28, 28, 1],
    labels int32 [n]), in file order. Small enough (60k x 3 KB) to shuffle on device."""
    batches = list(make_batches(data_dir, split, batch_size=8192, limit=limit))
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    return images, labels
