"""Feed-forward building blocks: RMSNorm and a dense SwiGLU MLP.

The MLP runs the same SwiGLU as every expert (`moejax.moe.experts.swiglu`); the
mixture-of-experts layer is `moejax.models.moe_layer`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.moe.experts import swiglu
from moejax.norms import rms_norm
from moejax.parallel.sharding import param


class RMSNorm(nnx.Module):
    """`rms_norm` over the last axis with a learned scale `[dim]` (`eps` as the checkpoint's)."""

    def __init__(self, dim: int, *, param_dtype: jnp.dtype, eps: float = 1e-6):
        self.scale = param(jnp.ones((dim,), param_dtype), ("embed",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


def dense_init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype, fan_in_axis: int):
    init = jax.nn.initializers.variance_scaling(
        1.0,
        "fan_in",
        "truncated_normal",
        in_axis=fan_in_axis,
        out_axis=-1,
        batch_axis=tuple(range(fan_in_axis)),
    )
    return init(key, shape, dtype)


class MLP(nnx.Module):
    """Dense SwiGLU feed-forward `[batch, length, d_model] -> [batch, length, d_model]`."""

    def __init__(self, d_model: int, d_ff: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.w_gate = param(
            dense_init(rngs.params(), (d_model, d_ff), param_dtype, 0), ("embed", "mlp")
        )
        self.w_up = param(
            dense_init(rngs.params(), (d_model, d_ff), param_dtype, 0), ("embed", "mlp")
        )
        self.w_down = param(
            dense_init(rngs.params(), (d_ff, d_model), param_dtype, 0), ("mlp", "embed")
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        return swiglu(
            x.astype(dt),
            self.w_gate[...].astype(dt),
            self.w_up[...].astype(dt),
            self.w_down[...].astype(dt),
        )
