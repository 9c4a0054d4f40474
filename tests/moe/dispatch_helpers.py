"""What the dispatch tests share: random problems, a per-token float64 loop reference, and
`run_moe`, `moe_ffn` jitted with each strategy's options built from keywords."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from moejax import moe
from moejax.routers.base import Routing
from moejax.routers.softmax_top_k import softmax_top_k

jit_softmax_top_k = jax.jit(softmax_top_k, static_argnames=("top_k", "renormalize"))

# The built-in strategies that run on one device (the others split experts over a mesh).
ONE_DEVICE = tuple(name for name, spec in moe.DISPATCHES.items() if spec.fits_expert_shards(1))


def options_for(strategy: str, **options: object) -> moe.DispatchOptions:
    """The options of `strategy` from those of `options` that it has: `capacity_factor=4.0`
    reaches "capacity" and is ignored by "dropless"."""
    options_class = moe.get(strategy).options
    fields = {f.name for f in dataclasses.fields(options_class)}
    return options_class(**{name: value for name, value in options.items() if name in fields})


# Strategy and options pick the program, so they are static under jit.
@functools.partial(jax.jit, static_argnames=("strategy", "options", "train"))
def _jit_moe_ffn(x, routing, params, shared_params, *, strategy, options, train):
    return moe.moe_ffn(
        x,
        routing,
        params,
        strategy=strategy,
        options=options,
        train=train,
        shared_params=shared_params,
    )


def run_moe(
    x: jax.Array,
    routing: Routing,
    params: dict[str, jax.Array],
    *,
    strategy: str,
    shared_params: dict[str, jax.Array] | None = None,
    train: bool = True,
    **options: object,
) -> moe.MoEOutput:
    """`moe_ffn` jitted, with `options_for(strategy, **options)`."""
    chosen = options_for(strategy, **options)
    return _jit_moe_ffn(
        x, routing, params, shared_params, strategy=strategy, options=chosen, train=train
    )


def problem(
    tokens: int,
    num_experts: int,
    top_k: int,
    d_model: int,
    d_ff: int,
    seed: int = 0,
    dtype: jnp.dtype = jnp.float32,
) -> tuple[jax.Array, Routing, dict[str, jax.Array]]:
    """Random activations, a softmax top-k routing and SwiGLU expert weights of unit-ish scale."""
    # numpy draws and a jitted router: eager jax would compile every op anew for each shape.
    rng = np.random.default_rng(seed)

    def normal(*shape: int, scale: float = 1.0) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape) * scale, dtype)

    x = normal(tokens, d_model)
    routing = jit_softmax_top_k(normal(tokens, num_experts).astype(jnp.float32), top_k=top_k)
    params = {
        "w_gate": normal(num_experts, d_model, d_ff, scale=d_model**-0.5),
        "w_up": normal(num_experts, d_model, d_ff, scale=d_model**-0.5),
        "w_down": normal(num_experts, d_ff, d_model, scale=d_ff**-0.5),
    }
    return x, routing, params


def loop_reference(
    x: jax.Array,
    expert_index: jax.Array,
    combine_weights: jax.Array,
    params: dict[str, jax.Array],
    dropped: np.ndarray | None = None,
) -> np.ndarray:
    """For each token, for each of its experts (unless dropped): that expert's SwiGLU, weighted."""
    x = np.asarray(x, np.float64)
    w = {name: np.asarray(value, np.float64) for name, value in params.items()}
    expert_index = np.asarray(expert_index)
    combine_weights = np.asarray(combine_weights, np.float64)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(expert_index.shape[1]):
            if dropped is not None and dropped[t, k]:
                continue
            e = expert_index[t, k]
            gate = x[t] @ w["w_gate"][e]
            silu = gate / (1.0 + np.exp(-gate))
            y[t] += combine_weights[t, k] * ((silu * (x[t] @ w["w_up"][e])) @ w["w_down"][e])
    return y


def dropped_by_priority(
    expert_index: np.ndarray, capacity: int, ranking: np.ndarray | None = None
) -> np.ndarray:
    """[tokens, top_k] bool: all first choices in `ranking`'s token order (default: by position),
    then all second choices, ..."""
    expert_index = np.asarray(expert_index)
    if ranking is None:
        ranking = np.arange(expert_index.shape[0])
    filled = np.zeros(expert_index.max() + 1, dtype=int)
    dropped = np.zeros(expert_index.shape, dtype=bool)
    for k in range(expert_index.shape[1]):
        for t in ranking:
            e = expert_index[t, k]
            dropped[t, k] = filled[e] >= capacity
            filled[e] += 1
    return dropped
