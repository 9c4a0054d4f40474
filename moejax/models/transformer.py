"""Decoder-only transformer language model with mixture-of-experts feed-forward layers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.attention import Attention
from moejax.config import ModelConfig
from moejax.depth.halting import relative_norm_halting
from moejax.models.layers import MLP, MoELayer, MoEOptions, RMSNorm
from moejax.sharding import constrain, param

ACTIVATION = ("batch", "length", "activation_embed")


class Block(nnx.Module):
    """Pre-norm residual block: attention, then a dense or mixture-of-experts feed-forward."""

    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        self.attention_norm = RMSNorm(config.d_model, param_dtype=param_dtype)
        self.attention = Attention(
            config.d_model,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            config.rope_base,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.ffn_norm = RMSNorm(config.d_model, param_dtype=param_dtype)
        self.is_moe = config.is_moe_layer(layer)
        self.halting_threshold = config.halting_threshold
        if self.is_moe:
            options = MoEOptions(
                **{f.name: getattr(config, f.name) for f in dataclasses.fields(MoEOptions)}
            )
            self.ffn = MoELayer(
                config.d_model,
                config.expert_d_ff,
                config.num_experts,
                config.top_k,
                options,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        else:
            self.ffn = MLP(
                config.d_model, config.d_ff, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )

    def __call__(
        self, x: jax.Array, token_ids: jax.Array, *, train: bool = True
    ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
        x = x + self.attention(self.attention_norm(x)).astype(x.dtype)
        x = constrain(x, ACTIVATION)
        if self.is_moe:
            update, aux = self.ffn(self.ffn_norm(x), token_ids, train=train)
            if not train:
                # Measured at evaluation only: the relative size of the MoE update, and with a
                # threshold, zero-shot halting of the tokens whose update is small.
                halted, halting = relative_norm_halting(
                    x, update.astype(x.dtype), threshold=self.halting_threshold
                )
                aux = {
                    **aux,
                    "mean_relative_norm": halting["mean_relative_norm"],
                    "halted_fraction": halting["halted_fraction"],
                }
                return constrain(halted, ACTIVATION), aux
        else:
            update, aux = self.ffn(self.ffn_norm(x)), None
        return constrain(x + update.astype(x.dtype), ACTIVATION), aux


class TransformerLM(nnx.Module):
    """Byte- or token-level causal language model.

    `__call__(tokens [batch, length] int32)` returns logits `[batch, length, vocab]` (float32)
    and a list with one aux dict per MoE layer (None for dense layers).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        param_dtype = jnp.dtype(config.param_dtype)
        self.embedding = param(
            jax.random.normal(rngs.params(), (config.vocab_size, config.d_model), param_dtype)
            * 0.02,
            ("vocab", "embed"),
        )
        self.blocks = nnx.List([Block(config, i, rngs=rngs) for i in range(config.num_layers)])
        self.final_norm = RMSNorm(config.d_model, param_dtype=param_dtype)
        if not config.tie_embeddings:
            self.unembedding = param(
                jax.random.normal(rngs.params(), (config.d_model, config.vocab_size), param_dtype)
                * config.d_model**-0.5,
                ("embed", "vocab"),
            )

    def __call__(
        self, tokens: jax.Array, *, train: bool = True
    ) -> tuple[jax.Array, list[dict | None]]:
        dtype = jnp.dtype(self.config.dtype)
        x = jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)  # [batch, length, d]
        # The tied table is small (std 0.02); scaling keeps the residual stream at unit RMS.
        if self.config.tie_embeddings:
            x = x * (self.config.d_model**0.5)
        x = constrain(x, ACTIVATION)
        aux_per_layer = []
        for block in self.blocks:
            x, aux = block(x, tokens, train=train)
            aux_per_layer.append(aux)
        x = self.final_norm(x)
        unembed = self.embedding[...].T if self.config.tie_embeddings else self.unembedding[...]
        logits = jnp.einsum(
            "bld,dv->blv", x, unembed.astype(dtype), preferred_element_type=jnp.float32
        )
        return constrain(logits, ("batch", "length", "activation_vocab")), aux_per_layer
