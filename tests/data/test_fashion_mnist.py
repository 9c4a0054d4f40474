"""The Fashion-MNIST builder: checksums, IDX parsing, array_record through grain."""

import gzip
import hashlib
import pathlib

import numpy as np
import pytest

from moejax.data import fashion_mnist


def _write_idx(path: pathlib.Path, array: np.ndarray) -> tuple[str, int]:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw))
    return hashlib.sha256(raw).hexdigest(), len(raw)


@pytest.fixture
def fake_source(tmp_path):
    rng = np.random.default_rng(0)
    expected = {}
    arrays = {}
    for split, count in (("train", 12), ("test", 5)):
        images = rng.integers(0, 256, (count, 28, 28))
        labels = rng.integers(0, 10, count)
        image_file, label_file = fashion_mnist.FILES[split]
        expected[image_file] = _write_idx(tmp_path / image_file, images)
        expected[label_file] = _write_idx(tmp_path / label_file, labels)
        arrays[split] = (images, labels)
    return tmp_path, expected, arrays


def test_real_files_match_the_release_checksums_and_shapes():
    source = fashion_mnist.source_dir()
    images = fashion_mnist.read_idx(
        source / "t10k-images-idx3-ubyte.gz", fashion_mnist.EXPECTED["t10k-images-idx3-ubyte.gz"]
    )
    labels = fashion_mnist.read_idx(
        source / "t10k-labels-idx1-ubyte.gz", fashion_mnist.EXPECTED["t10k-labels-idx1-ubyte.gz"]
    )
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert np.array_equal(np.bincount(labels), np.full(10, 1000))


def test_a_file_with_other_content_is_rejected(fake_source):
    source, expected, _ = fake_source
    name = "t10k-labels-idx1-ubyte.gz"
    with pytest.raises(ValueError, match="differ from the expected"):
        fashion_mnist.read_idx(source / name, fashion_mnist.EXPECTED[name])
    fashion_mnist.read_idx(source / name, expected[name])


def test_builder_writes_records_that_grain_batches_back_in_order(fake_source, tmp_path):
    source, expected, arrays = fake_source
    data_dir = tmp_path / "tfds"
    fashion_mnist.prepare(data_dir, source=source, expected=expected)
    images, labels = fashion_mnist.load_arrays(data_dir, "train")
    assert images.shape == (12, 28, 28, 1) and images.dtype == np.float32
    assert np.allclose(images[..., 0] * 255.0, arrays["train"][0])
    assert np.array_equal(labels, arrays["train"][1])
    batches = list(fashion_mnist.make_batches(data_dir, "train", batch_size=4, seed=1))
    assert len(batches) == 3 and batches[0]["image"].shape == (4, 28, 28, 1)
    shuffled = np.concatenate([b["label"] for b in batches])
    assert sorted(shuffled) == sorted(arrays["train"][1])


def test_real_dataset_has_all_records(fmnist_dir):
    assert len(fashion_mnist.data_source(fmnist_dir, "train")) == 60000
    assert len(fashion_mnist.data_source(fmnist_dir, "test")) == 10000
