"""`SparseAttention`: a drop-in for `moejax.attention.Attention` whose key blocks are chosen by a
static pattern or by content routing, and attended with `kernels_pallas.block_sparse_attention`
(per batch and head shard inside `jax.shard_map` under a multi-device mesh: `sharded_kernel`).

The module owns the projections and the per-kind parameters (key convolution, DMA importance
projection, k-means centroids, Flux router); the routing math lives in the sibling modules.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.attention import (
    apply_rotary,
    check_hidden,
    head_shape,
    init_projections,
    rotary_angles,
)
from moejax.parallel.sharding import constrain, param
from moejax.routers.base import RouterState
from moejax.sparse_attention import masks, sharded_kernel
from moejax.sparse_attention.bilevel import bilevel_select
from moejax.sparse_attention.dynamic_mask import (
    append_key_bias,
    dynamic_mask_select,
    key_importance,
)
from moejax.sparse_attention.flux import ROUTER_NAME, FluxRouter, flux_budget_loss, flux_gate
from moejax.sparse_attention.moba import causal_key_conv, moba_select
from moejax.sparse_attention.options import AttentionOptions
from moejax.sparse_attention.routing_transformer import (
    cluster_select,
    normalise,
    routing_centroid_update,
    shared_keys,
    shift_to_previous,
)
from moejax.sparse_attention.selection import causal_density


class ClusterCentroids(RouterState):
    """Routing Transformer k-means centroids `[heads, num_clusters, head_dim]`: updated by a
    moving average outside the gradient, kept and checkpointed with the router state."""


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
    """Which blocks to visit and how: the kernel's mask and flags, and routing diagnostics.

    `block_mask [batch or 1, heads or 1, q_blocks, kv_blocks]` bool (numpy for static
    patterns); `selected [batch, heads or 1, q_blocks, top_k]` int32 routed kv blocks (-1:
    none), None for static patterns; `max_kv_blocks` the static bound on visited blocks per
    query block.
    """

    block_mask: jax.Array | np.ndarray
    block_q: int
    block_kv: int
    max_kv_blocks: int
    window: int | None = None
    selected: jax.Array | None = None


def static_plan(options: AttentionOptions, length: int) -> AttentionPlan:
    """The fixed pattern of the dense, local and global_local kinds."""
    block = options.block_size
    if options.kind == "dense":
        pattern = masks.causal(length, block, block)
    elif options.kind == "local":
        pattern = masks.sliding_window(length, block, block, options.window)
    else:
        pattern = masks.global_local(length, block, block, options.window, options.num_global)
    # Host data, not a jax array: the kernel derives its visit lists from a concrete mask.
    return AttentionPlan(
        pattern.block_mask[None, None],
        block,
        block,
        pattern.max_kv_blocks,
        window=pattern.window,
    )


def _routed_plan(options: AttentionOptions, selection, block_q: int, bound: int) -> AttentionPlan:
    kv_blocks = selection.block_mask.shape[-1]
    return AttentionPlan(
        selection.block_mask,
        block_q,
        options.block_size,
        min(bound, kv_blocks),
        selected=selection.selected,
    )


class SparseAttention(nnx.Module):
    """Causal grouped-query self-attention with rotary positions over a sparse set of key blocks.

    Same constructor as `moejax.attention.Attention` plus `options` (default: dense blocks,
    `AttentionOptions()`); with the routing kind and
    `options.shared_qk` (the default) the keys are the queries and there is no `w_k`.
    `__call__(x [batch, length, d_model], *, train=True, capture=False)` returns
    `(y [batch, length, d_model], metrics)` with float32 scalars: `attention_density` (share of
    causal block pairs visited; with a Flux router, the expected share after its per-sequence
    choice), and with a Flux router `flux_full_share`, `flux_budget_loss`. `train=True`
    updates the k-means centroids of the routing kind. `capture=True` sows the routing
    diagnostics `block_mask` and `selected` (`AttentionPlan` fields) as `nnx.Intermediate`s,
    e.g. to measure routing recall: call it through `nnx.capture(fn, nnx.Intermediate)`.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        rope_base: float = 10_000.0,
        *,
        options: AttentionOptions | None = None,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        num_kv_heads, head_dim = head_shape(
            d_model, num_heads, num_kv_heads, head_dim, "SparseAttention"
        )
        options = AttentionOptions() if options is None else options
        self.d_model = d_model
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_base, self.dtype, self.options = rope_base, dtype, options
        projections = init_projections(
            rngs,
            d_model,
            num_heads,
            num_kv_heads,
            head_dim,
            param_dtype,
            with_keys=not self.shares_qk,
        )
        for name, value in projections.items():
            setattr(self, name, value)
        if options.key_conv_width:
            # Identity at initialisation (tap 0 = 1): training decides how much to mix in.
            taps = jnp.zeros((options.key_conv_width, num_kv_heads, head_dim), param_dtype)
            self.key_conv = param(taps.at[0].set(1.0), (None, "kv_heads", "head_dim"))
        if options.kind == "dynamic_mask":
            delta = jax.random.normal(rngs.params(), (num_kv_heads, head_dim)) * head_dim**-0.5
            self.dma_delta = param(delta.astype(param_dtype), ("kv_heads", "head_dim"))
            self.dma_gain = param(jnp.ones((num_kv_heads,), param_dtype), ("kv_heads",))
        if options.kind == "routing":
            centroids = jax.random.normal(
                rngs.params(), (num_heads, options.num_clusters, head_dim), jnp.float32
            )
            self.centroids = ClusterCentroids(
                normalise(centroids), out_sharding=(None, None, None), eager_sharding=False
            )
        if options.flux_router:
            setattr(
                self,
                ROUTER_NAME,
                FluxRouter(d_model, options.flux_hidden, param_dtype=param_dtype, rngs=rngs),
            )

    @property
    def shares_qk(self) -> bool:
        """True when keys are the queries (Routing Transformer with `shared_qk`)."""
        return self.options.kind == "routing" and self.options.shared_qk

    def _plan(self, q_route, k_route, importance, *, train: bool) -> AttentionPlan:
        options, length = self.options, q_route.shape[1]
        kind, block = options.kind, options.block_size
        if kind in ("dense", "local", "global_local"):
            return static_plan(options, length)
        # A query block can only route to the kv blocks strictly before its own.
        top_k = min(options.top_k, max(length // block - 1, 1))
        if kind == "moba":
            selection = moba_select(
                q_route, k_route, block_q=options.block_q, block_kv=block, top_k=top_k
            )
            return _routed_plan(options, selection, options.block_q, top_k + 1)
        if kind == "bilevel":
            selection = bilevel_select(q_route, k_route, block=block, top_k=top_k)
            return _routed_plan(options, selection, block, top_k + 1)
        if kind == "routing":
            routing = cluster_select(
                q_route,
                k_route,
                self.centroids[...],
                block=block,
                top_k=top_k,
                num_local=options.num_local,
            )
            if train:
                self.centroids[...] = routing_centroid_update(
                    self.centroids[...], routing, momentum=options.centroid_momentum
                )
            return _routed_plan(options, routing.selection, block, top_k + options.num_local)
        selection = dynamic_mask_select(
            importance, heads=self.num_heads, block=block, top_k=top_k, num_local=options.num_local
        )
        return _routed_plan(options, selection, block, top_k + options.num_local)

    def _attend(self, q, k, v, plan: AttentionPlan, bias=None) -> jax.Array:
        scale = self.head_dim**-0.5
        if bias is not None:
            q, k, v = append_key_bias(q, k, v, bias, scale)
        out = sharded_kernel.block_sparse_attention(
            q,
            k,
            v,
            plan.block_mask,
            block_q=plan.block_q,
            block_kv=plan.block_kv,
            causal=True,
            window=plan.window,
            scale=scale,
            max_kv_blocks=plan.max_kv_blocks,
            impl=self.options.impl,
        )
        return out[..., : self.head_dim]

    def __call__(
        self, x: jax.Array, *, train: bool = True, capture: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`x [batch, length, d_model]` -> (`[batch, length, d_model]`, metrics)."""
        options = self.options
        check_hidden("SparseAttention", x, self.d_model)
        options.check_length(x.shape[1])
        x = x.astype(self.dtype)
        q = jnp.einsum("bld,dhk->blhk", x, self.w_q[...].astype(self.dtype))
        if self.shares_qk:
            k = shared_keys(q, self.num_kv_heads)
        else:
            k = jnp.einsum("bld,dhk->blhk", x, self.w_k[...].astype(self.dtype))
        v = jnp.einsum("bld,dhk->blhk", x, self.w_v[...].astype(self.dtype))
        q = constrain(q, ("batch", "length", "activation_heads", "head_dim"))
        if options.key_conv_width:
            k = causal_key_conv(k, self.key_conv[...])
        # Routing reads the keys before rotary: a block mean of rotated keys blurs their content
        # with their relative phases.
        bias = None
        if options.kind == "dynamic_mask":
            bias = key_importance(v, self.dma_delta[...], self.dma_gain[...])
        k_route = shift_to_previous(k) if self.shares_qk else k
        plan = self._plan(q, k_route, bias, train=train)
        angles = rotary_angles(jnp.arange(x.shape[1]), self.head_dim, self.rope_base)
        q, k = apply_rotary(q, angles), apply_rotary(k, angles)
        if self.shares_qk:  # rotated at their own positions, then moved: offsets stay true
            k, v = shift_to_previous(k), shift_to_previous(v)
        out = self._attend(q, k, v, plan, bias)
        density = causal_density(plan.block_mask, plan.block_q, plan.block_kv)
        metrics = {"attention_density": density}
        if options.flux_router:
            out, metrics = self._flux(x, q, k, v, out, density, train=train)
        if capture:
            self.sow(nnx.Intermediate, "block_mask", plan.block_mask)
            if plan.selected is not None:
                self.sow(nnx.Intermediate, "selected", plan.selected)
        y = jnp.einsum("blhk,hkd->bld", out, self.w_o[...].astype(self.dtype))
        return y, metrics

    def _flux(self, x, q, k, v, sparse_out, sparse_density, *, train: bool):
        router = getattr(self, ROUTER_NAME)
        gate, prob = flux_gate(router(x))
        dense_plan = static_plan(dataclasses.replace(self.options, kind="dense"), x.shape[1])

        def with_dense():
            full = self._attend(q, k, v, dense_plan)
            g = gate.reshape(-1, 1, 1, 1).astype(full.dtype)
            return g * full + (1 - g) * sparse_out

        # At inference the dense path runs only when some sequence of the batch picked it.
        out = (
            with_dense()
            if train
            else jax.lax.cond(jnp.any(gate > 0), with_dense, lambda: sparse_out)
        )
        full_share = jnp.mean(gate)
        metrics = {
            "attention_density": full_share + (1 - full_share) * sparse_density,
            "flux_full_share": full_share,
            "flux_budget_loss": flux_budget_loss(prob, self.options.flux_target_full_share),
        }
        return out, metrics
