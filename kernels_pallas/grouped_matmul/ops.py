"""The public grouped matmul: argument checks and the choice of implementation."""

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike, DTypeLike

from kernels_pallas.grouped_matmul import xla_tiled

GMM_IMPLS = ("auto", "xla", "xla_tiled")


def gmm(
    lhs: ArrayLike,
    rhs: ArrayLike,
    group_sizes: ArrayLike,
    *,
    impl: str = "auto",
    preferred_element_type: DTypeLike | None = None,
    tile_m: int | None = None,
) -> jax.Array:
    """Grouped matmul with the contract of `jax.lax.ragged_dot`.

    Rows of `lhs` are sorted by group: group g owns `group_sizes[g]` consecutive rows, which
    are multiplied by `rhs[g]`. Rows past `sum(group_sizes)` come out as zeros. The sum must not
    exceed m; it is a traced value, so that is the caller's promise, not a check.

    Args:
      lhs: [m, k] floating, rows sorted by group.
      rhs: [num_groups, k, n], same dtype as `lhs`.
      group_sizes: [num_groups] int32.
      impl: one of `GMM_IMPLS`. "xla" is `jax.lax.ragged_dot`; "xla_tiled" runs each group as
        dense matmuls over row tiles (`xla_tiled`); "auto" is `resolve_impl("auto")`.
      preferred_element_type: output dtype; defaults to the dtype of `lhs`. Products are
        accumulated in at least float32 whatever the input dtype.
      tile_m: largest row tile of "xla_tiled", a positive int; defaults to
        `xla_tiled.default_tile_m(m, num_groups)`. Ignored by "xla".

    Returns:
      [m, n] in `preferred_element_type` (or the dtype of `lhs`).
    """
    impl = resolve_impl(impl)
    if tile_m is not None and (
        isinstance(tile_m, bool) or not isinstance(tile_m, int) or tile_m < 1
    ):
        raise ValueError(f"tile_m: got {tile_m!r}; allowed: None or a positive int")
    lhs, rhs, group_sizes = jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(group_sizes)
    _check_operands(lhs, rhs, group_sizes)
    out_dtype = jnp.dtype(lhs.dtype if preferred_element_type is None else preferred_element_type)
    if not jnp.issubdtype(out_dtype, jnp.floating):
        raise ValueError(f"preferred_element_type: must be floating, got {out_dtype}")
    if impl == "xla_tiled":
        if tile_m is None:
            tile_m = xla_tiled.default_tile_m(lhs.shape[0], rhs.shape[0])
        return xla_tiled.gmm_tiled(lhs, rhs, group_sizes, tile_m=tile_m, out_dtype=out_dtype)
    # bf16 sums over k lose too much precision; accumulate wide and round once at the end.
    accumulate_dtype = jnp.promote_types(out_dtype, jnp.float32)
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=accumulate_dtype)
    return out.astype(out_dtype)  # [m, n]


def resolve_impl(impl: str) -> str:
    """The implementation `impl` names on the default backend: "auto" becomes a concrete one.

    XLA:CPU lowers `ragged_dot` to a dense matmul masked per group, num_groups times the useful
    work, so "auto" takes "xla_tiled" there; GPU and TPU lower `ragged_dot` to ragged kernels,
    so "auto" takes "xla" on them.
    """
    if impl not in GMM_IMPLS:
        raise ValueError(f"impl: unknown value {impl!r}; allowed: {', '.join(GMM_IMPLS)}")
    if impl != "auto":
        return impl
    return "xla_tiled" if jax.default_backend() == "cpu" else "xla"


def _check_operands(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> None:
    """Raises a ValueError naming the offending argument when shapes or dtypes disagree."""
    if lhs.ndim != 2:
        raise ValueError(f"lhs: expected [m, k], got shape {lhs.shape}")
    if rhs.ndim != 3:
        raise ValueError(f"rhs: expected [num_groups, k, n], got shape {rhs.shape}")
    if group_sizes.ndim != 1:
        raise ValueError(f"group_sizes: expected [num_groups], got shape {group_sizes.shape}")
    if lhs.shape[1] != rhs.shape[1]:
        raise ValueError(
            f"rhs: contracting size {rhs.shape[1]} (shape {rhs.shape}) does not match "
            f"lhs's {lhs.shape[1]} (shape {lhs.shape})"
        )
    if group_sizes.shape[0] != rhs.shape[0]:
        raise ValueError(
            f"group_sizes: {group_sizes.shape[0]} groups but rhs holds {rhs.shape[0]} "
            f"(shape {rhs.shape})"
        )
    if not jnp.issubdtype(lhs.dtype, jnp.floating):
        raise ValueError(f"lhs: dtype must be floating, got {lhs.dtype}")
    if rhs.dtype != lhs.dtype:
        raise ValueError(f"rhs: dtype {rhs.dtype} differs from lhs's {lhs.dtype}")
    if group_sizes.dtype != jnp.int32:
        raise ValueError(f"group_sizes: dtype must be int32, got {group_sizes.dtype}")
