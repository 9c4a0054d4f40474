"""The one expert FFN (`moejax.moe.experts`): SwiGLU for the dense MLP, shared experts and
stacked experts, against numpy float64."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.models.layers import MLP
from moejax.moe import init_expert_params, shared_expert_ffn, swiglu
from tests.routers.routing_helpers import draw_normal, swiglu64, swiglu_params


def test_shared_experts_match_float64_sum() -> None:
    rng = np.random.default_rng(5)
    x = draw_normal(rng, 12, 6)
    shared = swiglu_params(rng, 2, 6, 10)
    x64 = np.asarray(x, np.float64)
    expected = swiglu64(x64, shared, 0) + swiglu64(x64, shared, 1)
    out = jax.jit(shared_expert_ffn)(x, shared)
    chex.assert_type(out, jnp.float32)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)

    bf16 = jax.jit(shared_expert_ffn)(x.astype(jnp.bfloat16), shared)
    chex.assert_type(bf16, jnp.bfloat16)
    np.testing.assert_allclose(bf16.astype(jnp.float32), expected, rtol=5e-2, atol=5e-2)


def test_shared_experts_reject_mismatched_shapes() -> None:
    rng = np.random.default_rng(6)
    x = draw_normal(rng, 4, 6)
    shared = swiglu_params(rng, 2, 6, 10)
    with pytest.raises(ValueError, match=r"shared_params\['w_down'\]: expected shape \(2, 10, 6\)"):
        shared_expert_ffn(x, {**shared, "w_down": shared["w_down"][:, :, :5]})
    with pytest.raises(ValueError, match=r"shared_params\['w_gate'\]: expected \[num_shared"):
        shared_expert_ffn(x, {**shared, "w_gate": shared["w_gate"][0]})
    with pytest.raises(ValueError, match=r"shared_params: missing \['w_up'\]"):
        shared_expert_ffn(x, {"w_gate": shared["w_gate"], "w_down": shared["w_down"]})


def test_init_expert_params_shapes_and_fan_in_scale():
    params = init_expert_params(jax.random.key(0), 4, 64, 256)
    chex.assert_shape([params["w_gate"], params["w_up"]], (4, 64, 256))
    chex.assert_shape(params["w_down"], (4, 256, 64))
    np.testing.assert_allclose(float(jnp.std(params["w_gate"])), 64**-0.5, rtol=0.05)
    np.testing.assert_allclose(float(jnp.std(params["w_down"])), 256**-0.5, rtol=0.05)


def test_dense_mlp_is_the_expert_swiglu() -> None:
    """The dense MLP runs `moejax.moe.swiglu`, which is one expert's SwiGLU."""
    rng = np.random.default_rng(11)
    x = draw_normal(rng, 2, 3, 6)
    mlp = MLP(6, 10, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    params = {name: getattr(mlp, name)[...][None] for name in ("w_gate", "w_up", "w_down")}
    expected = swiglu64(np.asarray(x, np.float64), params, 0)
    np.testing.assert_allclose(mlp(x), expected, rtol=1e-5, atol=1e-6)
    direct = swiglu(x, *(params[name][0] for name in ("w_gate", "w_up", "w_down")))
    np.testing.assert_allclose(direct, expected, rtol=1e-5, atol=1e-6)
