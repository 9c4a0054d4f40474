"""RMSNorm, the one normalisation of moejax's transformer (blocks, the final norm, q/k norms,
the latent-attention bottlenecks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(
    x: jax.Array, scale: jax.Array, eps: float = 1e-6, axes: int | tuple[int, ...] = -1
) -> jax.Array:
    """`x / rms(x) * scale`, the root mean square taken over `axes` of `x` (the last by
    default; `scale` broadcasts against those axes), computed in float32, returned in x's dtype.

    Root Mean Square Layer Normalization (Zhang & Sennrich, 2019).
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=axes, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)
