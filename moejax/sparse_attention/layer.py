"""`SparseAttention`: a drop-in for `moejax.attention.Attention` whose key blocks are chosen by a
static pattern or by content routing, and attended with `kernels_pallas.block_sparse_attention`
(per batch and head shard inside `jax.shard_map` under a multi-device mesh: `sharded_kernel`).

The module owns the projections, the key convolution, the Flux router and the parameters and
state the kind's spec declares; which blocks to visit is the kind's plan function
(`moejax.sparse_attention.base.AttentionKindSpec`), handed exactly the inputs it needs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.attention import check_hidden, head_shape, init_projections
from moejax.parallel.sharding import constrain, param
from moejax.rotary import apply_rotary, rotary_angles
from moejax.sparse_attention import sharded_kernel
from moejax.sparse_attention.base import AttentionPlan, HeadShape, KindState
from moejax.sparse_attention.config import AttentionConfig
from moejax.sparse_attention.dense import DenseOptions, dense_plan
from moejax.sparse_attention.dynamic_mask import append_key_bias
from moejax.sparse_attention.flux import ROUTER_NAME, FluxRouter, flux_budget_loss, flux_gate
from moejax.sparse_attention.moba import causal_key_conv
from moejax.sparse_attention.routing import shared_keys, shift_to_previous
from moejax.sparse_attention.selection import causal_density


class SparseAttention(nnx.Module):
    """Causal grouped-query self-attention with rotary positions over a sparse set of key blocks.

    Same constructor as `moejax.attention.Attention` plus `attention` (an `AttentionConfig`;
    default: dense blocks). When the kind's options share queries and keys (routing with
    `shared_qk`, the default) the keys are the queries and there is no `w_k`.
    `__call__(x [batch, length, d_model], *, train=True, capture=False)` returns
    `(y [batch, length, d_model], metrics)` with float32 scalars: `attention_density` (share of
    causal block pairs visited; with a Flux router, the expected share after its per-sequence
    choice), and with a Flux router `flux_full_share`, `flux_budget_loss`. `train=True` keeps
    the kind's new state (the routing kind's k-means centroids). `capture=True` sows the
    routing diagnostics `block_mask` and `selected` (`AttentionPlan` fields) as
    `nnx.Intermediate`s, e.g. to measure routing recall: call it through
    `nnx.capture(fn, nnx.Intermediate)`.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        rope_base: float = 10_000.0,
        *,
        attention: AttentionConfig | None = None,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        num_kv_heads, head_dim = head_shape(
            d_model, num_heads, num_kv_heads, head_dim, "SparseAttention"
        )
        attention = AttentionConfig() if attention is None else attention
        self.d_model = d_model
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_base, self.dtype, self.attention = rope_base, dtype, attention
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
        if attention.key_conv_width:
            # Identity at initialisation (tap 0 = 1): training decides how much to mix in.
            taps = jnp.zeros((attention.key_conv_width, num_kv_heads, head_dim), param_dtype)
            self.key_conv = param(taps.at[0].set(1.0), (None, "kv_heads", "head_dim"))
        spec, shape = attention.spec, HeadShape(num_heads, num_kv_heads, head_dim)
        if spec.init_params is not None:
            kind_params = spec.init_params(rngs.params(), shape, attention.options)
            for name, axes in spec.param_axes.items():
                setattr(self, name, param(kind_params[name].astype(param_dtype), axes))
        if spec.state is not None:
            state = spec.state
            value = state.init(rngs.params(), shape, attention.options)
            variable = KindState(value, out_sharding=state.axes, eager_sharding=False)
            setattr(self, state.name, variable)
        if attention.flux_router:
            setattr(
                self,
                ROUTER_NAME,
                FluxRouter(d_model, attention.flux_hidden, param_dtype=param_dtype, rngs=rngs),
            )

    @property
    def shares_qk(self) -> bool:
        """True when keys are the queries (the kind's options say so)."""
        return self.attention.shares_qk

    def _plan(self, q_route, k_route, v, *, train: bool) -> AttentionPlan:
        """The kind's plan, handed exactly the inputs its spec declares."""
        attention = self.attention
        spec = attention.spec
        context = {
            "queries": lambda: q_route,
            "keys": lambda: k_route,
            "values": lambda: v,
            "num_heads": lambda: self.num_heads,
            "params": lambda: {name: getattr(self, name)[...] for name in spec.param_axes},
            "state": lambda: getattr(self, spec.state.name)[...],
        }
        plan = spec.plan(
            length=q_route.shape[1],
            block_size=attention.block_size,
            options=attention.options,
            **{need: context[need]() for need in spec.needs},
        )
        if spec.state is None:
            return plan
        plan, new_state = plan
        if train:
            getattr(self, spec.state.name)[...] = new_state
        return plan

    def _attend(self, q, k, v, plan: AttentionPlan) -> jax.Array:
        scale = self.head_dim**-0.5
        if plan.key_bias is not None:
            q, k, v = append_key_bias(q, k, v, plan.key_bias, scale)
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
            impl=self.attention.impl,
        )
        return out[..., : self.head_dim]

    def __call__(
        self, x: jax.Array, *, train: bool = True, capture: bool = False
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`x [batch, length, d_model]` -> (`[batch, length, d_model]`, metrics)."""
        attention = self.attention
        check_hidden("SparseAttention", x, self.d_model)
        attention.check_length(x.shape[1])
        x = x.astype(self.dtype)
        q = jnp.einsum("bld,dhk->blhk", x, self.w_q[...].astype(self.dtype))
        if self.shares_qk:
            k = shared_keys(q, self.num_kv_heads)
        else:
            k = jnp.einsum("bld,dhk->blhk", x, self.w_k[...].astype(self.dtype))
        v = jnp.einsum("bld,dhk->blhk", x, self.w_v[...].astype(self.dtype))
        q = constrain(q, ("batch", "length", "activation_heads", "head_dim"))
        if attention.key_conv_width:
            k = causal_key_conv(k, self.key_conv[...])
        # Routing reads the keys before rotary: a block mean of rotated keys blurs their content
        # with their relative phases.
        k_route = shift_to_previous(k) if self.shares_qk else k
        plan = self._plan(q, k_route, v, train=train)
        angles = rotary_angles(jnp.arange(x.shape[1]), self.head_dim, self.rope_base)
        q, k = apply_rotary(q, angles), apply_rotary(k, angles)
        if self.shares_qk:  # rotated at their own positions, then moved: offsets stay true
            k, v = shift_to_previous(k), shift_to_previous(v)
        out = self._attend(q, k, v, plan)
        density = causal_density(plan.block_mask, plan.block_q, plan.block_kv)
        metrics = {"attention_density": density}
        if attention.flux_router:
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
        length, block = x.shape[1], self.attention.block_size
        full_plan = dense_plan(length=length, block_size=block, options=DenseOptions())

        def with_dense():
            full = self._attend(q, k, v, full_plan)
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
            "flux_budget_loss": flux_budget_loss(prob, self.attention.flux_target_full_share),
        }
        return out, metrics
