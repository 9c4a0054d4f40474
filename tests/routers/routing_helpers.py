"""Inputs and checks the router tests share: logits, hidden states, jit with static options,
and a float64 SwiGLU expert reference for the tests that go through `moe_ffn`."""

import jax
import jax.numpy as jnp
import numpy as np

# Sizes for the routers that own parameters (cosine, relu_rmsnorm, recurrent).
D_MODEL, EXPERTS = 16, 6


def normal_logits(tokens: int, experts: int, seed: int = 0, scale: float = 2.0) -> jax.Array:
    """[tokens, experts] float32 normals from numpy's generator, times `scale`."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((tokens, experts)) * scale, jnp.float32)


def key_logits(tokens: int, experts: int, seed: int = 0) -> jax.Array:
    """[tokens, experts] normals from `jax.random.key(seed)`, times 2.

    Not the values of `normal_logits` for the same seed: the tests written on these draws keep them.
    """
    return jax.random.normal(jax.random.key(seed), (tokens, experts)) * 2.0


def hidden_states(tokens: int, d_model: int = D_MODEL, seed: int = 0) -> jax.Array:
    """[tokens, d_model] float32 normals from numpy's generator."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((tokens, d_model)), jnp.float32)


def draw_normal(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> jax.Array:
    """float32 normals of `shape` drawn from `rng` (which advances), times `scale`."""
    return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


def swiglu_params(
    rng: np.random.Generator, num: int, d_model: int, d_ff: int
) -> dict[str, jax.Array]:
    """`num` SwiGLU experts' weights, drawn from `rng` with fan-in scaling."""
    return {
        "w_gate": draw_normal(rng, num, d_model, d_ff, scale=d_model**-0.5),
        "w_up": draw_normal(rng, num, d_model, d_ff, scale=d_model**-0.5),
        "w_down": draw_normal(rng, num, d_ff, d_model, scale=d_ff**-0.5),
    }


def swiglu64(x: np.ndarray, params: dict[str, jax.Array], e: int) -> np.ndarray:
    """Expert e's SwiGLU in float64 on x [..., d_model]."""
    w = {name: np.asarray(value, np.float64)[e] for name, value in params.items()}
    gate = x @ w["w_gate"]
    return (gate / (1.0 + np.exp(-gate)) * (x @ w["w_up"])) @ w["w_down"]


def jit_router(router, *static: str):
    """jit with the options that pick the program (shapes, loop lengths, branches) static."""
    return jax.jit(router, static_argnames=static)


def assert_same_routing(a, b, exact: bool = True) -> None:
    """Same experts; same gates and probabilities, bit for bit or to float32 rounding."""
    np.testing.assert_array_equal(a.expert_index, b.expert_index)
    if exact:
        np.testing.assert_array_equal(a.combine_weights, b.combine_weights)
        np.testing.assert_array_equal(a.router_probs, b.router_probs)
    else:
        np.testing.assert_allclose(a.combine_weights, b.combine_weights, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(a.router_probs, b.router_probs, rtol=1e-6, atol=1e-7)
