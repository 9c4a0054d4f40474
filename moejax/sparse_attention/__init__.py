"""Sparse attention: static block patterns and content-routed block selection (MoBA, Routing
Transformer, BiFormer, dynamic-mask attention), a Flux layer router, and the `SparseAttention`
layer that runs them on `kernels_pallas.block_sparse_attention`."""

from moejax.sparse_attention.layer import AttentionPlan, ClusterCentroids, SparseAttention
from moejax.sparse_attention.options import KINDS, AttentionOptions

__all__ = ["KINDS", "AttentionOptions", "AttentionPlan", "ClusterCentroids", "SparseAttention"]
