"""Causal multi-head attention with rotary positions and grouped-query heads.

The math lives in `apply_rotary` and `causal_attention`; `Attention` owns the projections.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.errors import require
from moejax.parallel.sharding import constrain, param


def check_hidden(layer: str, x: jax.Array, d_model: int) -> None:
    """ValueError naming `layer`, the shape of `x` and the one expected, `[batch, length,
    d_model]`: the check at a layer's boundary, before a reshape or einsum fails obscurely."""
    require(
        getattr(x, "ndim", None) == 3 and x.shape[-1] == d_model,
        f"{layer}: x.shape",
        getattr(x, "shape", type(x).__name__),
        f"[batch, length, d_model={d_model}]",
    )


def head_shape(
    d_model: int, num_heads: int, num_kv_heads: int | None, head_dim: int | None, layer: str
) -> tuple[int, int]:
    """`(num_kv_heads, head_dim)` with their defaults (`num_heads`, `d_model // num_heads`)
    filled in and checked: ValueError naming the argument."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    head_dim = d_model // num_heads if head_dim is None else head_dim
    require(
        num_kv_heads > 0 and num_heads % num_kv_heads == 0,
        f"{layer} num_kv_heads",
        num_kv_heads,
        f"a divisor of num_heads={num_heads}",
    )
    require(
        head_dim > 0 and head_dim % 2 == 0,
        f"{layer} head_dim",
        head_dim,
        "an even number > 0 (rotary embeddings rotate pairs of features; the default is "
        f"d_model // num_heads = {d_model // num_heads})",
    )
    return num_kv_heads, head_dim


def rotary_angles(positions: jax.Array, head_dim: int, base: float) -> jax.Array:
    """Rotation angles `[length, head_dim // 2]` for integer `positions [length]`.

    RoFormer: Enhanced Transformer with Rotary Position Embedding (Su et al., 2021).
    """
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    return positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [length, head_dim/2]


def apply_rotary(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotates feature pairs (first half, second half) of `x [batch, length, heads, head_dim]`.

    `angles` is `[length, head_dim // 2]` (shared by the batch) or `[batch, length, head_dim // 2]`.
    """
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    if angles.ndim == 2:
        angles = angles[None]
    cos = jnp.cos(angles)[:, :, None, :]  # [batch or 1, length, 1, head_dim/2]
    sin = jnp.sin(angles)[:, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, return_probs: bool = False
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Causal softmax attention.

    Args:
      q: `[batch, length, heads, head_dim]`.
      k, v: `[batch, length, kv_heads, head_dim]`, `heads % kv_heads == 0` (grouped-query).
      return_probs: also return the attention weights averaged over heads.

    Returns:
      `[batch, length, heads, head_dim]`; logits and softmax in float32. With `return_probs`,
      also `[batch, length, length]` float32 weights (rows sum to 1), the attention graph that
      the attention-aware router reads.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * (head_dim**-0.5)
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)  # [b, kv_heads, group, q, k]
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v)
    out = out.reshape(batch, length, heads, head_dim)
    if return_probs:
        return out, jnp.mean(probs, axis=(1, 2))
    return out


def init_projections(
    rngs: nnx.Rngs,
    d_model: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    param_dtype: jnp.dtype,
    *,
    with_keys: bool = True,
) -> dict[str, nnx.Param]:
    """The projections of grouped-query attention, drawn in the order q, k, v, o.

    Returns `w_q [d_model, heads, head_dim]`, `w_k` and `w_v [d_model, kv_heads, head_dim]`
    (no `w_k` with `with_keys=False`, for layers whose keys are their queries) and
    `w_o [heads, head_dim, d_model]`, fan-in scaled, with their logical axis names.
    """
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    kv_axes = ("embed", "kv_heads", "head_dim")
    projections = {
        "w_q": param(
            init(rngs.params(), (d_model, num_heads, head_dim), param_dtype),
            ("embed", "heads", "head_dim"),
        )
    }
    if with_keys:
        projections["w_k"] = param(
            init(rngs.params(), (d_model, num_kv_heads, head_dim), param_dtype), kv_axes
        )
    projections["w_v"] = param(
        init(rngs.params(), (d_model, num_kv_heads, head_dim), param_dtype), kv_axes
    )
    out_init = jax.nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
    )
    projections["w_o"] = param(
        out_init(rngs.params(), (num_heads, head_dim, d_model), param_dtype),
        ("heads", "head_dim", "embed"),
    )
    return projections


class Attention(nnx.Module):
    """Causal grouped-query self-attention with rotary positions.

    `num_kv_heads` defaults to `num_heads` (multi-head attention), `head_dim` to
    `d_model // num_heads`.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        rope_base: float = 10_000.0,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        num_kv_heads, head_dim = head_shape(d_model, num_heads, num_kv_heads, head_dim, "Attention")
        self.d_model = d_model
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_base, self.dtype = rope_base, dtype
        projections = init_projections(
            rngs, d_model, num_heads, num_kv_heads, head_dim, param_dtype
        )
        for name, value in projections.items():
            setattr(self, name, value)

    def __call__(
        self, x: jax.Array, positions: jax.Array | None = None, *, return_probs: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """`x [batch, length, d_model]` -> `[batch, length, d_model]`.

        `positions [batch, length]` int32 are the tokens' places in their sequence for the
        rotary angles (default 0..length-1; mixture-of-depths passes the selected tokens'
        original places). `return_probs` also returns the head-averaged attention weights
        `[batch, length, length]`.
        """
        check_hidden("Attention", x, self.d_model)
        if positions is not None:
            require(
                tuple(positions.shape) == x.shape[:2],
                "Attention: positions.shape",
                tuple(positions.shape),
                f"[batch, length] = {list(x.shape[:2])}",
            )
        x = x.astype(self.dtype)
        q = jnp.einsum("bld,dhk->blhk", x, self.w_q[...].astype(self.dtype))
        k = jnp.einsum("bld,dhk->blhk", x, self.w_k[...].astype(self.dtype))
        v = jnp.einsum("bld,dhk->blhk", x, self.w_v[...].astype(self.dtype))
        q = constrain(q, ("batch", "length", "activation_heads", "head_dim"))
        if positions is None:
            angles = rotary_angles(jnp.arange(x.shape[1]), self.head_dim, self.rope_base)
        else:
            angles = jax.vmap(lambda p: rotary_angles(p, self.head_dim, self.rope_base))(positions)
        q, k = apply_rotary(q, angles), apply_rotary(k, angles)
        out = causal_attention(q, k, v, return_probs=return_probs)
        probs = None
        if return_probs:
            out, probs = out
        y = jnp.einsum("blhk,hkd->bld", out, self.w_o[...].astype(self.dtype))
        return (y, probs) if return_probs else y
