"""Block-sparse attention: softmax attention over the (query block, kv block) pairs a mask keeps."""

from kernels_pallas.block_sparse_attention.ops import (
    BSA_IMPLS,
    block_sparse_attention,
    resolve_impl,
)
from kernels_pallas.block_sparse_attention.reference import (
    block_sparse_attention_reference,
    dense_mask,
)

__all__ = [
    "BSA_IMPLS",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "dense_mask",
    "resolve_impl",
]
