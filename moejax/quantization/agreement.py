"""Router consistency under compression: how many of a token's top-k experts survive.

Quantising a router (or the layers before it) moves its logits, and a small move can swap
which experts a token reaches; EAQuant ("EAQuant: Enhancing Post-Training Quantization for MoE
Models via Expert-Aware Optimization") aligns the quantised router to keep these choices, and
this is the number that tells whether it did.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.errors import require


@functools.partial(jax.jit, static_argnums=(2,))
def _topk_agreement(logits_a: jax.Array, logits_b: jax.Array, top_k: int) -> jax.Array:
    chosen_a = jax.lax.top_k(logits_a, top_k)[1]  # [tokens, top_k]
    chosen_b = jax.lax.top_k(logits_b, top_k)[1]  # [tokens, top_k]
    shared = jnp.any(chosen_a[:, :, None] == chosen_b[:, None, :], axis=-1)  # [tokens, top_k]
    return jnp.mean(jnp.sum(shared, axis=-1) / top_k)


def topk_agreement(logits_a: jax.Array, logits_b: jax.Array, top_k: int) -> jax.Array:
    """Mean over tokens of `|topk(a) ∩ topk(b)| / top_k`, a float32 scalar in [0, 1], from
    `logits_a, logits_b [tokens, experts]` (any monotone transform of either, such as the
    router probabilities, gives the same value). Ties go to the lower expert index."""
    shape_a, shape_b = getattr(logits_a, "shape", None), getattr(logits_b, "shape", None)
    require(getattr(logits_a, "ndim", None) == 2, "logits_a.shape", shape_a, "[tokens, experts]")
    require(shape_b == shape_a, "logits_b.shape", shape_b, f"logits_a's shape {shape_a}")
    require(
        isinstance(top_k, int) and 1 <= top_k <= shape_a[1],
        "top_k",
        top_k,
        f"an int in 1..{shape_a[1]} (the number of experts)",
    )
    return _topk_agreement(logits_a, logits_b, top_k)
