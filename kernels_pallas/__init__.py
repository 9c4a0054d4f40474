"""Hand-written kernels for sparse computation, each with a pure-jnp reference beside it."""

from kernels_pallas.block_sparse_attention import BSA_IMPLS, block_sparse_attention
from kernels_pallas.grouped_matmul import GMM_IMPLS, gmm

__all__ = ["BSA_IMPLS", "GMM_IMPLS", "block_sparse_attention", "gmm"]
