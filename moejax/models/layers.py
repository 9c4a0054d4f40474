"""Feed-forward building blocks: RMSNorm, a dense SwiGLU MLP, and the mixture-of-experts layer.

Each module owns its parameters and calls the pure functions of `moejax.routing` and
`moejax.moe`; the math is testable without Flax.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
from flax import nnx

from moejax import metrics, moe, routing
from moejax.routers.stateful import STATEFUL_ROUTERS
from moejax.sharding import constrain, param


def rms_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-6) -> jax.Array:
    """`x [..., d] / rms(x) * scale [d]`, computed in float32, returned in x's dtype.

    Root Mean Square Layer Normalization (Zhang & Sennrich, 2019).
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """`(silu(x @ w_gate) * (x @ w_up)) @ w_down` for `x [..., d]`, `w_gate, w_up [d, f]`.

    GLU Variants Improve Transformer (Shazeer, 2020).
    """
    hidden = jax.nn.silu(x @ w_gate) * (x @ w_up)  # [..., f]
    return hidden @ w_down


class RouterState(nnx.Variable):
    """Router state updated outside the gradient (expert biases, k-means centroids); kept in the
    train state beside the parameters and checkpointed with them."""


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, param_dtype: jnp.dtype):
        self.scale = param(jnp.ones((dim,), param_dtype), ("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...])


def _dense_init(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype, fan_in_axis: int):
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
            _dense_init(rngs.params(), (d_model, d_ff), param_dtype, 0), ("embed", "mlp")
        )
        self.w_up = param(
            _dense_init(rngs.params(), (d_model, d_ff), param_dtype, 0), ("embed", "mlp")
        )
        self.w_down = param(
            _dense_init(rngs.params(), (d_ff, d_model), param_dtype, 0), ("mlp", "embed")
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = self.dtype
        return swiglu(
            x.astype(dt),
            self.w_gate[...].astype(dt),
            self.w_up[...].astype(dt),
            self.w_down[...].astype(dt),
        )


class MoELayer(nnx.Module):
    """Routed SwiGLU experts stored as stacked `[experts, ...]` parameters.

    Returns the layer output and a dict of the router's weighted auxiliary loss and routing
    statistics (expert load, entropy, dropped fraction).
    """

    def __init__(
        self,
        d_model: int,
        expert_d_ff: int,
        num_experts: int,
        top_k: int,
        *,
        router: str,
        renormalize_top_k: bool,
        dispatch: str,
        capacity_factor: float,
        load_balance_weight: float,
        router_z_weight: float,
        gmm_impl: str,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        self.num_experts, self.top_k = num_experts, top_k
        self.route = routing.get_router(router)
        # Routers declare extra inputs (token ids, train/eval mode) as keyword options.
        accepted = inspect.signature(self.route).parameters
        self.router_inputs = tuple(n for n in ("token_ids", "train") if n in accepted)
        self.renormalize_top_k = renormalize_top_k
        self.dispatch, self.capacity_factor, self.gmm_impl = dispatch, capacity_factor, gmm_impl
        self.load_balance_weight, self.router_z_weight = load_balance_weight, router_z_weight
        self.dtype = dtype
        self.state_spec = STATEFUL_ROUTERS.get(router)
        if self.state_spec is not None:
            initial = self.state_spec.init(rngs.params(), d_model, num_experts)
            self.router_state = RouterState(
                initial, out_sharding=self.state_spec.axes, eager_sharding=False
            )
        # Router logits decide discrete assignments, so the router starts near uniform.
        self.router = param(
            jax.random.normal(rngs.params(), (d_model, num_experts), param_dtype) * 0.02,
            ("embed", None),
        )
        shape_in, shape_out = (
            (num_experts, d_model, expert_d_ff),
            (num_experts, expert_d_ff, d_model),
        )
        self.w_gate = param(
            _dense_init(rngs.params(), shape_in, param_dtype, 1), ("expert", "embed", "expert_mlp")
        )
        self.w_up = param(
            _dense_init(rngs.params(), shape_in, param_dtype, 1), ("expert", "embed", "expert_mlp")
        )
        self.w_down = param(
            _dense_init(rngs.params(), shape_out, param_dtype, 1), ("expert", "expert_mlp", "embed")
        )

    def __call__(
        self, x: jax.Array, token_ids: jax.Array | None = None, *, train: bool = True
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """`x [batch, length, d_model]` -> (`[batch, length, d_model]`, aux dict).

        `token_ids [batch, length]` reach routers that take them (hash routing); `train=False`
        makes batch-dependent routers (Sinkhorn) route causally, token by token.
        """
        batch, length, d_model = x.shape
        tokens = x.reshape(batch * length, d_model).astype(self.dtype)  # [tokens, d_model]
        router_logits = tokens.astype(jnp.float32) @ self.router[...].astype(jnp.float32)
        available = {"train": train}
        if token_ids is not None:
            available["token_ids"] = token_ids.reshape(-1)  # [tokens]
        inputs = {name: available[name] for name in self.router_inputs if name in available}
        if self.state_spec is not None:
            inputs.update(self.state_spec.inputs(self.router_state.value, tokens))
        result = self.route(
            router_logits, top_k=self.top_k, renormalize=self.renormalize_top_k, **inputs
        )
        if self.state_spec is not None and train:
            new_state = self.state_spec.update(self.router_state.value, tokens, result)
            self.router_state.value = jax.lax.stop_gradient(new_state)
        dt = self.dtype
        experts = {
            "w_gate": constrain(self.w_gate[...].astype(dt), ("expert", "embed", "expert_mlp")),
            "w_up": constrain(self.w_up[...].astype(dt), ("expert", "embed", "expert_mlp")),
            "w_down": constrain(self.w_down[...].astype(dt), ("expert", "expert_mlp", "embed")),
        }
        out = moe.moe_ffn(
            tokens,
            result,
            experts,
            strategy=self.dispatch,
            capacity_factor=self.capacity_factor,
            gmm_impl=self.gmm_impl,
        )
        losses = result.aux_losses
        aux = {
            "aux_loss": self.load_balance_weight * losses["load_balance"]
            + self.router_z_weight * losses["router_z"],
            "load_balance_loss": losses["load_balance"],
            "router_z_loss": losses["router_z"],
            "dropped_fraction": jnp.asarray(out.dropped_fraction, jnp.float32),
            # Chunk sparsity over 8 consecutive tokens, as BlockFFN reports it.
            **metrics.layer_metrics(
                result, self.num_experts, seq_len=length, chunk_size=min(8, length)
            ),
        }
        return out.y.reshape(batch, length, d_model), aux
