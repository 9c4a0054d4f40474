"""A small decoder for MQAR: token embedding, pre-norm blocks of `SparseAttention` and a SwiGLU
MLP, and an output head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.models.layers import MLP, RMSNorm
from moejax.parallel.sharding import param
from moejax.sparse_attention import AttentionConfig, SparseAttention


class RecallBlock(nnx.Module):
    def __init__(self, d_model: int, num_heads: int, attention: AttentionConfig, *, rngs):
        f32 = jnp.float32
        self.attention_norm = RMSNorm(d_model, param_dtype=f32)
        self.attention = SparseAttention(
            d_model,
            num_heads,
            num_heads,
            d_model // num_heads,
            10000.0,
            attention=attention,
            dtype=f32,
            param_dtype=f32,
            rngs=rngs,
        )
        self.mlp_norm = RMSNorm(d_model, param_dtype=f32)
        self.mlp = MLP(d_model, 2 * d_model, dtype=f32, param_dtype=f32, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool, capture: bool):
        update, metrics = self.attention(self.attention_norm(x), train=train, capture=capture)
        x = x + update
        return x + self.mlp(self.mlp_norm(x)), metrics


class RecallModel(nnx.Module):
    """`tokens [batch, length]` -> (logits `[batch, length, vocab]`, per-layer metrics)."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        num_heads: int,
        num_layers: int,
        attention: AttentionConfig,
        *,
        rngs: nnx.Rngs,
    ):
        init = jax.nn.initializers.normal(1.0)
        self.embed = param(init(rngs.params(), (vocab_size, d_model)), ("vocab", "embed"))
        self.blocks = nnx.List(
            [RecallBlock(d_model, num_heads, attention, rngs=rngs) for _ in range(num_layers)]
        )
        self.final_norm = RMSNorm(d_model, param_dtype=jnp.float32)
        head_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        self.head = param(head_init(rngs.params(), (d_model, vocab_size)), ("embed", "vocab"))

    def __call__(self, tokens: jax.Array, *, train: bool = True, capture: bool = False):
        x = self.embed[...][tokens]  # [batch, length, d_model]
        metrics = []
        for block in self.blocks:
            x, block_metrics = block(x, train=train, capture=capture)
            metrics.append(block_metrics)
        return self.final_norm(x) @ self.head[...], metrics
