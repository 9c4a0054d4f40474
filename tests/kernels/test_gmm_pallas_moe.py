"""The dropless MoE layer through the interpreted Pallas kernels agrees with its default path."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

from moejax.moe import DroplessOptions, moe_ffn
from moejax.routers.softmax_top_k import softmax_top_k


@functools.partial(jax.jit, static_argnames="gmm_impl")
def _output_and_grads(x, logits, params, gmm_impl):
    def loss(x, params):
        routing = softmax_top_k(logits, top_k=2)
        options = DroplessOptions(gmm_impl=gmm_impl)
        y = moe_ffn(x, routing, params, strategy="dropless", options=options).y
        return jnp.sum(y * jnp.cos(y)), y

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, params)


def test_dropless_moe_with_interpreted_kernels_matches_default_path() -> None:
    tokens, d_model, d_ff, num_experts = 11, 8, 12, 4
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((tokens, d_model)), jnp.float32)
    logits = jnp.asarray(rng.standard_normal((tokens, num_experts)) * 3, jnp.float32)
    params = {
        "w_gate": jnp.asarray(rng.standard_normal((num_experts, d_model, d_ff)), jnp.float32),
        "w_up": jnp.asarray(rng.standard_normal((num_experts, d_model, d_ff)), jnp.float32),
        "w_down": jnp.asarray(rng.standard_normal((num_experts, d_ff, d_model)), jnp.float32),
    }
    (_, y), grads = _output_and_grads(x, logits, params, "interpret")
    (_, want_y), want_grads = _output_and_grads(x, logits, params, "auto")
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(grads, want_grads, rtol=1e-4, atol=1e-4)
