"""Grouped matrix multiplication: one matmul per contiguous group of rows (the MoE expert step)."""

from kernels_pallas.grouped_matmul.ops import GMM_IMPLS, gmm, resolve_impl
from kernels_pallas.grouped_matmul.reference import (
    gmm_dense_reference,
    gmm_reference,
    tgmm_reference,
)
from kernels_pallas.grouped_matmul.tiling import KernelTilings, default_tilings

__all__ = [
    "GMM_IMPLS",
    "KernelTilings",
    "default_tilings",
    "gmm",
    "gmm_dense_reference",
    "gmm_reference",
    "resolve_impl",
    "tgmm_reference",
]
