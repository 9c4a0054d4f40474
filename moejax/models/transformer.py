"""Decoder-only transformer language model with mixture-of-experts feed-forward layers.

Besides dense and MoE feed-forwards, a block can spend less than one full pass per token:
mixture-of-depths (only the top share of each sequence's tokens runs the block), a Dr.LLM layer
router (skip / execute / repeat per sequence, at evaluation) and zero-shot relative-norm halting
of MoE updates (at evaluation). The math of each lives in `moejax.depth`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import depth
from moejax.attention import Attention
from moejax.config import ModelConfig, MoEConfig
from moejax.latent_attention import LatentAttention
from moejax.models.layers import MLP, RMSNorm
from moejax.models.moe_layer import MoELayer, RouterContext
from moejax.parallel.sharding import constrain, param
from moejax.sparse_attention import AttentionConfig, SparseAttention

ACTIVATION = ("batch", "length", "activation_embed")
# Mixture-of-depths weighs the block output by sigmoid(router score): bounded, so an untrained
# router neither flips nor blows up the update (the paper's raw score is the "identity" option).
MOD_ROUTER_ACTIVATION = "sigmoid"


def moe_dispatch_by_layer(config: ModelConfig) -> dict[int, MoEConfig]:
    """Layer index -> the `MoEConfig` of each MoE layer: `config.moe` with its dispatch options
    for that depth (a capacity schedule spreads the capacity factor over the MoE layers)."""
    moe = config.moe
    moe_layers = [i for i in range(config.num_layers) if moe.is_moe_layer(i)]
    return {
        layer: dataclasses.replace(moe, dispatch=moe.dispatch.at_depth(position, len(moe_layers)))
        for position, layer in enumerate(moe_layers)
    }


def _with_attention_aux(aux: dict | None, attention_aux: dict) -> dict | None:
    """A block's aux dict with the sparse attention's metrics (`attention_density`, ...) and
    the Flux router's budget loss added to its auxiliary loss."""
    if not attention_aux:
        return aux
    aux = dict(aux or {})
    aux.update(attention_aux)
    budget = attention_aux.get("flux_budget_loss", jnp.float32(0.0))
    aux["aux_loss"] = aux.get("aux_loss", jnp.float32(0.0)) + budget
    return aux


def _attention(
    config: ModelConfig, attention: AttentionConfig, dtype, param_dtype, rngs: nnx.Rngs
) -> nnx.Module:
    """A block's attention: a block-sparse kind, latent attention or grouped-query attention."""
    shape = (config.d_model, config.num_heads)
    common = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
    if attention.uses_block_kernel:
        return SparseAttention(
            *shape,
            config.num_kv_heads,
            config.head_dim,
            config.rope_base,
            attention=attention,
            **common,
        )
    if config.latent_attention.enabled:
        return LatentAttention(
            *shape,
            config.latent_attention,
            config.rope_base,
            rope_scaling=config.rope_scaling,
            max_position=config.max_seq_len,
            norm_eps=config.norm_eps,
            **common,
        )
    return Attention(
        *shape,
        config.num_kv_heads,
        config.head_dim,
        config.rope_base,
        options=config.attention_options(),
        **common,
    )


class Block(nnx.Module):
    """Pre-norm residual block: attention, then a dense or mixture-of-experts feed-forward,
    optionally behind a mixture-of-depths router or a Dr.LLM layer router."""

    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        *,
        moe: MoEConfig,
        attention: AttentionConfig,
        rngs: nnx.Rngs,
    ):
        dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
        self.attention_norm = RMSNorm(config.d_model, param_dtype=param_dtype, eps=config.norm_eps)
        # Full attention keeps its own module: it takes token positions (mixture-of-depths) and
        # returns its weights (attention-aware routing), which block-sparse kinds do not.
        self.is_sparse_attention = attention.uses_block_kernel
        self.attention = _attention(config, attention, dtype, param_dtype, rngs)
        self.ffn_norm = RMSNorm(config.d_model, param_dtype=param_dtype, eps=config.norm_eps)
        self.is_moe = config.is_moe_layer(layer)
        self.halting_threshold = config.moe.halting_threshold
        self.wants_attention_probs = self.is_moe and "attention_probs" in config.router.spec.needs
        if self.is_moe:
            self.ffn = MoELayer.from_config(
                config.d_model,
                moe,
                config.router,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        else:
            self.ffn = MLP(
                config.d_model, config.d_ff, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
        self.is_mod = config.is_mod_layer(layer)
        if self.is_mod:
            self.mod_capacity = config.depth.mod_capacity
            self.mod_predictor_weight = config.depth.mod_predictor_weight
            self.mod_router = param(
                jax.random.normal(rngs.params(), (config.d_model,), param_dtype)
                * config.d_model**-0.5,
                ("embed",),
            )
            self.mod_predictor = nnx.Dict(
                {
                    name: param(value, ("embed",) if value.ndim else ())
                    for name, value in depth.init_causal_predictor(
                        rngs.params(), config.d_model, dtype=param_dtype
                    ).items()
                }
            )
        self.has_layer_router = config.depth.layer_router_dim > 0
        if self.has_layer_router:
            router = depth.init_layer_router(
                rngs.params(), config.d_model, config.depth.layer_router_dim, param_dtype
            )
            axes = {"w_in": ("embed", None), "b_in": (None,), "w_out": (None, None)}
            self.layer_router = nnx.Dict(
                {name: param(value, axes.get(name, (None,))) for name, value in router.items()}
            )

    def residual_update(
        self,
        x: jax.Array,
        context: RouterContext,
        *,
        train: bool,
        positions: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None, jax.Array | None]:
        """What the block adds to `x [batch, n, d_model]`: (update, MoE aux, recurrent state).

        `positions [batch, n]` are the tokens' places in the sequence (mixture-of-depths hands
        the block a subset); None means 0..n-1.
        """
        attention_aux = {}
        if self.is_sparse_attention:
            attention_update, attention_aux = self.attention(self.attention_norm(x), train=train)
            attention_probs = None
        else:
            attended = self.attention(self.attention_norm(x), positions, return_probs=True)
            attention_update, attention_probs = attended
        attention_update = attention_update.astype(x.dtype)
        h = constrain(x + attention_update, ACTIVATION)
        if not self.is_moe:
            update = attention_update + self.ffn(self.ffn_norm(h)).astype(x.dtype)
            return update, _with_attention_aux(None, attention_aux), None
        if self.wants_attention_probs:
            context = dataclasses.replace(context, attention_probs=attention_probs)
        token_ids = context.token_ids
        if token_ids is not None and positions is not None:
            context = dataclasses.replace(
                context, token_ids=jnp.take_along_axis(token_ids, positions, axis=1)
            )
        ffn_update, aux, recurrent_state = self.ffn(self.ffn_norm(h), context, train=train)
        ffn_update = ffn_update.astype(x.dtype)
        if not train:
            # Measured at evaluation only: the relative size of the MoE update, and with a
            # threshold, zero-shot halting of the tokens whose update is small (Equifinality).
            relative = depth.relative_norm(h, ffn_update)  # [batch, n]
            halted = relative < self.halting_threshold
            ffn_update = jnp.where(halted[..., None], 0.0, ffn_update).astype(x.dtype)
            aux = {
                **aux,
                "mean_relative_norm": jnp.mean(relative),
                "halted_fraction": jnp.mean(halted.astype(jnp.float32)),
            }
        aux = _with_attention_aux(aux, attention_aux)
        return attention_update + ffn_update, aux, recurrent_state

    def __call__(
        self,
        x: jax.Array,
        context: RouterContext,
        *,
        train: bool = True,
        layer_decision: jax.Array | None = None,
    ) -> tuple[jax.Array, dict[str, jax.Array] | None, jax.Array | None]:
        """`x [batch, length, d_model]` -> (new x, aux dict or None, recurrent router state).

        `layer_decision [batch]` (skip / execute / repeat) overrides the layer router, as its
        teacher labels do while fitting it.
        """
        if self.is_mod:
            return self._mixture_of_depths(x, context, train=train)
        if self.has_layer_router and (layer_decision is not None or not train):
            return self._layer_routed(x, context, train=train, decision=layer_decision)
        update, aux, recurrent_state = self.residual_update(x, context, train=train)
        return constrain(x + update, ACTIVATION), aux, recurrent_state

    def cannot_decode(self) -> str | None:
        """Why this block cannot run `decode`, or None when it can."""
        if self.is_sparse_attention:
            return (
                "block-sparse attention plans over whole blocks of a full sequence; a cached "
                "step would need a per-token plan, which is not built"
            )
        if self.is_mod:
            return "mixture-of-depths chooses tokens by comparing a whole sequence"
        if self.has_layer_router:
            return "a layer router decides per whole sequence"
        if self.wants_attention_probs:
            return "the attention-aware router reads full attention weights"
        if self.is_moe and self.halting_threshold > 0:
            return "relative-norm halting is measured on whole sequences"
        return None

    def decode(
        self, x: jax.Array, positions: jax.Array, cache: Any, context: RouterContext
    ) -> tuple[jax.Array, Any, jax.Array | None]:
        """`x [batch, n, d_model]` at `positions [batch, n]` with the attention's cache ->
        (new x, the updated cache, recurrent router state); the evaluation-mode block."""
        update, cache = self.attention.decode(self.attention_norm(x), positions, cache)
        h = x + update.astype(x.dtype)
        if self.is_moe:
            ffn_update, _, state = self.ffn(self.ffn_norm(h), context, train=False)
        else:
            ffn_update, state = self.ffn(self.ffn_norm(h)), None
        return constrain(h + ffn_update.astype(x.dtype), ACTIVATION), cache, state

    def _mixture_of_depths(self, x: jax.Array, context: RouterContext, *, train: bool):
        inner_aux = {}

        def block_fn(selected: jax.Array, positions: jax.Array) -> jax.Array:
            update, aux, _ = self.residual_update(
                selected, context, train=train, positions=positions
            )
            inner_aux["moe"] = aux
            return update

        router = self.mod_router[...]
        predictor = {name: value[...] for name, value in self.mod_predictor.items()}
        if train:
            y, mod_aux = depth.mixture_of_depths(
                x,
                router,
                block_fn,
                capacity_fraction=self.mod_capacity,
                router_activation=MOD_ROUTER_ACTIVATION,
                predictor_params=predictor,
                block_takes_positions=True,
            )
            stats = {
                "mod_predictor_loss": mod_aux["predictor_loss"],
                "mod_predictor_accuracy": mod_aux["predictor_accuracy"],
                "mod_selected_fraction": jnp.mean(mod_aux["selected_mask"].astype(jnp.float32)),
            }
        else:
            # Top-C looks at the whole sequence; decoding can only use the causal predictor.
            y, mod_aux = depth.mixture_of_depths_causal(
                x,
                router,
                predictor,
                block_fn,
                router_activation=MOD_ROUTER_ACTIVATION,
                block_takes_positions=True,
            )
            stats = {"mod_selected_fraction": mod_aux["selected_fraction"]}
        # The block saw a subset (or a reordering) of the tokens, so per-token traces do not line
        # up with other layers' tokens.
        aux = {k: v for k, v in (inner_aux["moe"] or {}).items() if k != "top1_expert"}
        aux.update(stats)
        aux["aux_loss"] = aux.get("aux_loss", jnp.float32(0.0))
        if train:
            # The predictor reads stop_gradient(x), so its loss trains only the predictor.
            aux["aux_loss"] += self.mod_predictor_weight * stats["mod_predictor_loss"]
        return constrain(y, ACTIVATION), aux, None

    def _layer_routed(self, x, context: RouterContext, *, train: bool, decision):
        inner_aux = {}

        def block_fn(inputs: jax.Array) -> jax.Array:
            update, aux, _ = self.residual_update(inputs, context, train=train)
            inner_aux["moe"] = aux
            return update

        router = {name: value[...] for name, value in self.layer_router.items()}
        y, decision = depth.routed_block(x, router, block_fn, decision=decision)
        aux = dict(inner_aux["moe"] or {})
        for index, name in enumerate(depth.LAYER_DECISIONS):
            aux[f"layer_{name}_fraction"] = jnp.mean((decision == index).astype(jnp.float32))
        aux.setdefault("aux_loss", jnp.float32(0.0))
        return constrain(y, ACTIVATION), aux, None


class TransformerLM(nnx.Module):
    """Byte- or token-level causal language model.

    `__call__(tokens [batch, length] int32)` returns logits `[batch, length, vocab]` (float32)
    and a list with one aux dict per layer (None for dense layers with nothing to report).
    `attention` picks every block's attention (dense by default; block-sparse and routed kinds
    from `moejax.sparse_attention`).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        attention: AttentionConfig | None = None,
    ):
        self.config = config
        attention = AttentionConfig() if attention is None else attention
        param_dtype = jnp.dtype(config.param_dtype)
        self.embedding = param(
            jax.random.normal(rngs.params(), (config.vocab_size, config.d_model), param_dtype)
            * 0.02,
            ("vocab", "embed"),
        )
        moe_by_layer = moe_dispatch_by_layer(config)
        self.blocks = nnx.List(
            [
                Block(
                    config,
                    i,
                    moe=moe_by_layer.get(i, config.moe),
                    attention=attention,
                    rngs=rngs,
                )
                for i in range(config.num_layers)
            ]
        )
        self.final_norm = RMSNorm(config.d_model, param_dtype=param_dtype, eps=config.norm_eps)
        if not config.tie_embeddings:
            self.unembedding = param(
                jax.random.normal(rngs.params(), (config.d_model, config.vocab_size), param_dtype)
                * config.d_model**-0.5,
                ("embed", "vocab"),
            )
        spec = config.router.spec if config.moe.every else None
        if spec is not None and spec.init_shared_params is not None:
            # Parameters all MoE layers' routers share (RMoE's GRU cell); each layer owns the rest.
            shared = spec.init_shared_params(rngs.params(), config.router.options)
            self.router_gru = nnx.Dict(
                {
                    name: param(value.astype(param_dtype), spec.param_axes[name])
                    for name, value in shared.items()
                }
            )

    def embed(self, tokens: jax.Array) -> jax.Array:
        """`tokens [batch, length]` -> the residual stream `[batch, length, d_model]`."""
        dtype = jnp.dtype(self.config.dtype)
        x = jnp.take(self.embedding[...], tokens, axis=0).astype(dtype)  # [batch, length, d]
        # The tied table is small (std 0.02); scaling keeps the residual stream at unit RMS.
        if self.config.tie_embeddings and self.config.scale_embedding:
            x = x * (self.config.d_model**0.5)
        return constrain(x, ACTIVATION)

    def logits(self, x: jax.Array) -> jax.Array:
        """The residual stream `[batch, length, d_model]` -> logits `[batch, length, vocab]`."""
        x = self.final_norm(x)
        unembed = self.embedding[...].T if self.config.tie_embeddings else self.unembedding[...]
        logits = jnp.einsum(
            "bld,dv->blv",
            x,
            unembed.astype(jnp.dtype(self.config.dtype)),
            preferred_element_type=jnp.float32,
        )
        return constrain(logits, ("batch", "length", "activation_vocab"))

    def __call__(
        self,
        tokens: jax.Array,
        *,
        train: bool = True,
        rng: jax.Array | None = None,
        layer_decisions: jax.Array | None = None,
    ) -> tuple[jax.Array, list[dict | None]]:
        """Logits and per-layer aux of `tokens [batch, length]`.

        Args:
          tokens: [batch, length] int32.
          train: training mode (routing noise, train capacity, top-C mixture-of-depths) or
            evaluation (eval capacity, causal predictor, halting, layer routers).
          rng: key for routers with noise; layer i uses `fold_in(rng, i)`. None: no noise.
          layer_decisions: optional [num_layers, batch] int teacher decisions for the layer
            routers (`moejax.depth.SKIP/EXECUTE/REPEAT`), used while fitting them.
        """
        x = self.embed(tokens)
        shared = {}
        if hasattr(self, "router_gru"):
            shared = {name: value[...] for name, value in self.router_gru.items()}
        recurrent_state = None
        aux_per_layer = []
        for layer, block in enumerate(self.blocks):
            context = RouterContext(
                token_ids=tokens,
                rng=None if rng is None else jax.random.fold_in(rng, layer),
                recurrent_state=recurrent_state,
                shared_router_params=shared,
            )
            decision = None if layer_decisions is None else layer_decisions[layer]
            x, aux, state = block(x, context, train=train, layer_decision=decision)
            if state is not None:
                recurrent_state = state
            aux_per_layer.append(aux)
        return self.logits(x), aux_per_layer

    def init_cache(self, batch: int, max_len: int) -> list[Any]:
        """Empty decoding caches, one per block, for `batch` sequences of up to `max_len`
        positions. ValueError naming the block and the reason when one cannot decode."""
        for layer, block in enumerate(self.blocks):
            reason = block.cannot_decode()
            if reason is not None:
                raise ValueError(
                    f"TransformerLM: block {layer} cannot decode with a cache: {reason}"
                )
        return [block.attention.init_cache(batch, max_len) for block in self.blocks]

    def decode(
        self, tokens: jax.Array, positions: jax.Array, cache: list[Any]
    ) -> tuple[jax.Array, list[Any]]:
        """Logits `[batch, n, vocab]` of `tokens [batch, n]` at `positions [batch, n]` given
        the keys and values cached for the positions before them; returns the caches with
        these tokens' written. A prompt (n > 1, positions 0..n-1) fills the cache, then one
        token at a time (n = 1) extends it; both equal `__call__` in evaluation mode on the
        whole sequence."""
        x = self.embed(tokens)
        shared = {}
        if hasattr(self, "router_gru"):
            shared = {name: value[...] for name, value in self.router_gru.items()}
        recurrent_state = None
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            context = RouterContext(
                token_ids=tokens, recurrent_state=recurrent_state, shared_router_params=shared
            )
            x, layer_cache, state = block.decode(x, positions, layer_cache, context)
            if state is not None:
                recurrent_state = state
            new_cache.append(layer_cache)
        return self.logits(x), new_cache
