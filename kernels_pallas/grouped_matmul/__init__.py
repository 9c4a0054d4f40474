"""Grouped matrix multiplication: one matmul per contiguous group of rows (the MoE expert step)."""

from kernels_pallas.grouped_matmul.ops import GMM_IMPLS, gmm, resolve_impl
from kernels_pallas.grouped_matmul.reference import gmm_reference

__all__ = ["GMM_IMPLS", "gmm", "gmm_reference", "resolve_impl"]
