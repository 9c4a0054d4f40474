"""Hand-written kernels for sparse computation, each with a pure-jnp reference beside it."""

from kernels_pallas.grouped_matmul import GMM_IMPLS, gmm

__all__ = ["GMM_IMPLS", "gmm"]
