"""Sparse attention: a registry of attention kinds (static block patterns and content-routed
block selection: MoBA, Routing Transformer, BiFormer, dynamic-mask attention), a Flux layer
router, and the `SparseAttention` layer that runs them on
`kernels_pallas.block_sparse_attention`.

Each kind is one file that registers an `AttentionKindSpec`; the imports below fill the
registry, in the order `attention.kind` errors list them (dense, the default, first).
"""

# isort: off
from moejax.sparse_attention import dense  # noqa: F401 - each import registers its kind
from moejax.sparse_attention import local  # noqa: F401
from moejax.sparse_attention import global_local  # noqa: F401
from moejax.sparse_attention import moba  # noqa: F401
from moejax.sparse_attention import routing  # noqa: F401
from moejax.sparse_attention import bilevel  # noqa: F401
from moejax.sparse_attention import dynamic_mask  # noqa: F401

# isort: on
from moejax.sparse_attention.base import (
    KINDS,
    AttentionKindSpec,
    AttentionPlan,
    HeadShape,
    KindOptions,
    KindState,
    KindStateSpec,
    get,
    register,
)
from moejax.sparse_attention.config import AttentionConfig
from moejax.sparse_attention.layer import SparseAttention

__all__ = [
    "KINDS",
    "AttentionConfig",
    "AttentionKindSpec",
    "AttentionPlan",
    "HeadShape",
    "KindOptions",
    "KindState",
    "KindStateSpec",
    "SparseAttention",
    "get",
    "register",
]
