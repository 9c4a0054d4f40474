"""A small causal toy block and inputs shared by the depth tests."""

import jax
import jax.numpy as jnp
import numpy as np

D_MODEL = 8
W_BLOCK = np.asarray(
    jax.random.normal(jax.random.key(42), (D_MODEL, D_MODEL)) * D_MODEL**-0.5, np.float64
)


def causal_block(h: jax.Array) -> jax.Array:
    """A causal toy block: tanh of the running mean of `h @ W`; token t sees tokens <= t only."""
    z = h @ W_BLOCK.astype(h.dtype)  # [batch, n, d]
    steps = jnp.arange(1, h.shape[1] + 1, dtype=h.dtype)[None, :, None]
    return jnp.tanh(jnp.cumsum(z, axis=1) / steps)


def depth_inputs(batch: int, length: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """`x [batch, length, D_MODEL]` and router weights `[D_MODEL]`."""
    key_x, key_w = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(key_x, (batch, length, D_MODEL))
    router_weights = jax.random.normal(key_w, (D_MODEL,))
    return x, router_weights
