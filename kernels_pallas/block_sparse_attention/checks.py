"""Argument checks of `block_sparse_attention`: a ValueError naming each bad argument."""

import jax
import jax.numpy as jnp

from kernels_pallas.block_sparse_attention import mask_info


def check_positive_int(name: str, value: object, *, optional: bool = False) -> None:
    """Raises unless `value` is a positive int (or None when `optional`)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "None or a positive int" if optional else "a positive int"
        raise ValueError(f"{name}: got {value!r}; allowed: {allowed}")


def check_operands(q: jax.Array, k: jax.Array, v: jax.Array, block_q: int, block_kv: int) -> None:
    """Shapes, dtypes and divisibility of q, k and v by the block sizes."""
    if q.ndim != 4:
        raise ValueError(f"q: expected [batch, q_len, heads, head_dim], got shape {q.shape}")
    if k.ndim != 4:
        raise ValueError(f"k: expected [batch, kv_len, kv_heads, head_dim], got shape {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v: shape {v.shape} differs from k's {k.shape}")
    batch, q_len, heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"k: batch and head_dim of shape {k.shape} must match q's {q.shape} "
            "(layout [batch, kv_len, kv_heads, head_dim])"
        )
    if k.shape[2] < 1 or heads % k.shape[2]:
        raise ValueError(f"k: heads={heads} of q is not a multiple of kv_heads={k.shape[2]}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name}: dtype must be floating, got {x.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k, v: dtypes {k.dtype}, {v.dtype} differ from q's {q.dtype}")
    if q_len == 0 or k.shape[1] == 0:
        raise ValueError(f"q, k: lengths must be positive, got q_len={q_len}, kv_len={k.shape[1]}")
    if q_len % block_q:
        raise ValueError(f"block_q: q_len={q_len} is not divisible by block_q={block_q}")
    if k.shape[1] % block_kv:
        raise ValueError(f"block_kv: kv_len={k.shape[1]} is not divisible by block_kv={block_kv}")


def check_mask(
    name: str, mask: jax.Array, batch: int, heads: int, rows: int, cols: int, what: str
) -> None:
    """A bool mask of shape [batch or 1, heads or 1, rows, cols]."""
    expected = f"[batch ({batch}) or 1, heads ({heads}) or 1, {what}]"
    if mask.dtype != jnp.bool_:
        raise ValueError(f"{name}: dtype must be bool, got {mask.dtype}")
    if (
        mask.ndim != 4
        or mask.shape[0] not in (1, batch)
        or mask.shape[1] not in (1, heads)
        or mask.shape[2:] != (rows, cols)
    ):
        raise ValueError(
            f"{name}: expected shape {expected} = (.., .., {rows}, {cols}), got {mask.shape}"
        )


def check_segment_ids(
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    batch: int,
    q_len: int,
    kv_len: int,
) -> None:
    """Both or neither, int32, [batch, q_len] and [batch, kv_len]."""
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids, kv_segment_ids: give both or neither")
    if q_segment_ids is None:
        return
    for name, ids, length in (
        ("q_segment_ids", q_segment_ids, q_len),
        ("kv_segment_ids", kv_segment_ids, kv_len),
    ):
        if ids.shape != (batch, length):
            raise ValueError(f"{name}: expected shape ({batch}, {length}), got {ids.shape}")
        if ids.dtype != jnp.int32:
            raise ValueError(f"{name}: dtype must be int32, got {ids.dtype}")


def check_scalars(scale: object, logit_soft_cap: object, window: object) -> None:
    """scale and logit_soft_cap positive floats (or None), window a positive int (or None)."""
    for name, value in (("scale", scale), ("logit_soft_cap", logit_soft_cap)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
        ):
            raise ValueError(f"{name}: got {value!r}; allowed: None or a positive number")
    check_positive_int("window", window, optional=True)


def resolve_max_visits(name: str, given: int | None, block_mask: object, limit: int) -> int:
    """The static width of the visit lists along the last axis of `block_mask`.

    A concrete mask gives its exact maximum (and a `given` bound it exceeds is an error); a
    traced one takes `given`, or `limit` (every block) when none is given.
    """
    check_positive_int(name, given, optional=True)
    needed = mask_info.static_max_visits(block_mask)
    if given is not None and needed is not None and needed > given:
        raise ValueError(
            f"{name}: block_mask visits up to {needed} blocks in a row, more than {name}={given}"
        )
    if given is not None:
        return min(given, limit)
    return limit if needed is None else max(needed, 1)
