"""The one expert feed-forward of moejax: SwiGLU, for one dense MLP, stacked experts, shared
experts and grouped rows alike.

Shazeer, "GLU Variants Improve Transformer" (2020): `(silu(x @ w_gate) * (x @ w_up)) @ w_down`.
Every use differs only in how a projection contracts (a plain matmul, one batched over experts, a
grouped matmul over rows sorted by expert), so `swiglu` takes that contraction as an argument.
Stacked expert parameters are a dict

    {"w_gate": [experts, d_model, d_ff], "w_up": [experts, d_model, d_ff],
     "w_down": [experts, d_ff, d_model]}

Computation runs in x's dtype (parameters are cast to it, as a Flax layer's `dtype` does) with
matmuls accumulated in at least float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kernels_pallas import gmm

ExpertParams = dict[str, jax.Array]
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")
# A projection: (activations, weight) -> activations in the activations' dtype.
Matmul = Callable[[jax.Array, jax.Array], jax.Array]


def einsum(spec: str, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """einsum accumulated in at least float32 and returned in lhs's dtype, like `gmm`."""
    accumulate_dtype = jnp.promote_types(lhs.dtype, jnp.float32)
    return jnp.einsum(spec, lhs, rhs, preferred_element_type=accumulate_dtype).astype(lhs.dtype)


# `x [..., d] @ w [d, f]`: the dense MLP's projection.
dense_matmul: Matmul = functools.partial(einsum, "...i,io->...o")
# `x [experts, rows, d] @ w [experts, d, f]`, each expert on its own rows (capacity buffers).
batched_matmul: Matmul = functools.partial(einsum, "eri,eio->ero")


def grouped_matmul(group_sizes: jax.Array, impl: str = "auto") -> Matmul:
    """`rows [m, d] @ w [groups, d, f]` with rows sorted by group, `group_sizes [groups]` of them
    per group (`kernels_pallas.gmm`); rows past the groups come out zero."""
    return lambda rows, w: gmm(rows, w, group_sizes, impl=impl)


def swiglu(
    x: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    matmul: Matmul = dense_matmul,
    down_matmul: Matmul | None = None,
) -> jax.Array:
    """`down(silu(matmul(x, w_gate)) * matmul(x, w_up), w_down)`, the SwiGLU feed-forward.

    Args:
      x: [..., d_model] for the default `matmul` (`x @ w`, `w_gate, w_up [d_model, d_ff]`,
        `w_down [d_ff, d_model]`); whatever the given `matmul` contracts otherwise.
      matmul: the projection for all three weights, `dense_matmul` by default.
      down_matmul: the projection of `w_down` when it differs (summing shared experts).

    Returns:
      the feed-forward output, in x's dtype.
    """
    dtype = x.dtype
    w_gate, w_up, w_down = (w.astype(dtype) for w in (w_gate, w_up, w_down))
    hidden = jax.nn.silu(matmul(x, w_gate)) * matmul(x, w_up)  # [..., d_ff]
    return (down_matmul or matmul)(hidden, w_down)  # [..., d_model]


def expert_swiglu(x: jax.Array, expert_params: ExpertParams, matmul: Matmul) -> jax.Array:
    """`swiglu` of stacked expert weights (see the module docstring) with `matmul`."""
    return swiglu(x, *(expert_params[name] for name in EXPERT_WEIGHTS), matmul=matmul)


def init_expert_params(
    key: jax.Array, num_experts: int, d_model: int, d_ff: int, dtype: jnp.dtype = jnp.float32
) -> ExpertParams:
    """Random SwiGLU expert weights, normal with std 1/sqrt(fan_in) (see the module docstring
    for the shapes); for benchmarks and tests that need experts without a Flax module."""
    keys = jax.random.split(key, 3)
    shape_in, shape_out = (num_experts, d_model, d_ff), (num_experts, d_ff, d_model)
    return {
        "w_gate": jax.random.normal(keys[0], shape_in, dtype) * d_model**-0.5,
        "w_up": jax.random.normal(keys[1], shape_in, dtype) * d_model**-0.5,
        "w_down": jax.random.normal(keys[2], shape_out, dtype) * d_ff**-0.5,
    }


def shared_expert_ffn(x: jax.Array, shared_params: ExpertParams) -> jax.Array:
    """Shared experts: SwiGLU experts that every token passes through, summed.

    Dai et al., "DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts
    Language Models" (2024) isolate a few always-active shared experts so that knowledge every
    token needs is not learned again by each routed expert. Their output is added, unweighted,
    to the routed experts'.

    Args:
      x: [tokens, d_model].
      shared_params: {"w_gate": [num_shared, d_model, d_ff], "w_up": [num_shared, d_model, d_ff],
        "w_down": [num_shared, d_ff, d_model]}; d_ff may differ from the routed experts'.

    Returns:
      [tokens, d_model] in x's dtype: the sum over shared experts of each one's SwiGLU.
    """
    check_x(x)
    check_params(x, shared_params, "shared_params", "num_shared")
    return swiglu(
        x,
        *(shared_params[name] for name in EXPERT_WEIGHTS),
        matmul=functools.partial(einsum, "ti,sio->sto"),  # [shared, tokens, d_ff]
        # Contracting the shared axis with d_ff sums the experts inside one float32 accumulation.
        down_matmul=functools.partial(einsum, "sti,sio->to"),
    )


def check_x(x: jax.Array) -> None:
    if x.ndim != 2:
        raise ValueError(f"x: expected [tokens, d_model], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x: dtype must be floating, got {x.dtype}")


def check_params(x: jax.Array, params: ExpertParams, field: str, axis: str) -> int:
    """Validates stacked SwiGLU weights `field` against x and returns their leading size."""
    missing = set(EXPERT_WEIGHTS) - set(params)
    if missing:
        raise ValueError(f"{field}: missing {sorted(missing)}; got {sorted(params)}")
    if params["w_gate"].ndim != 3:
        raise ValueError(
            f"{field}['w_gate']: expected [{axis}, d_model, d_ff], "
            f"got shape {params['w_gate'].shape}"
        )
    d_model = x.shape[1]
    num_stacked, _, d_ff = params["w_gate"].shape
    expected = {
        "w_gate": (num_stacked, d_model, d_ff),
        "w_up": (num_stacked, d_model, d_ff),
        "w_down": (num_stacked, d_ff, d_model),
    }
    for name, shape in expected.items():
        if params[name].shape != shape:
            raise ValueError(
                f"{field}[{name!r}]: expected shape {shape} for x of shape {x.shape}, "
                f"got {params[name].shape}"
            )
    return num_stacked
