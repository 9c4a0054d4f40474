"""The default router: softmax over the logits, the top_k largest, float32 whatever the input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.routers.base import ROUTERS, Routing
from moejax.routers.base import get as get_router_spec
from moejax.routers.softmax_top_k import softmax_top_k
from tests.routers.routing_helpers import key_logits


@settings(max_examples=25, deadline=None)
@given(
    tokens=st.integers(1, 12),
    experts=st.integers(1, 8),
    data=st.data(),
)
def test_softmax_top_k_picks_the_k_largest_logits(
    tokens: int, experts: int, data: st.DataObject
) -> None:
    top_k = data.draw(st.integers(1, experts))
    # A random permutation per token: distinct logits, so there are no ties to break.
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    logits = np.stack([rng.permutation(experts) for _ in range(tokens)]).astype(np.float32)
    # jit compiles the router once per shape; eager mode would compile each op separately.
    routing = jax.jit(softmax_top_k, static_argnames="top_k")(jnp.asarray(logits), top_k=top_k)
    chex.assert_shape(routing.expert_index, (tokens, top_k))
    chex.assert_type(routing.expert_index, jnp.int32)
    expected = np.argsort(-logits, axis=-1)[:, :top_k]
    np.testing.assert_array_equal(routing.expert_index, expected)


def test_softmax_top_k_routes_in_float32_for_bf16_logits() -> None:
    routing = softmax_top_k(key_logits(6, 4).astype(jnp.bfloat16), top_k=2)
    chex.assert_type(
        [routing.combine_weights, routing.router_probs, *routing.aux_losses.values()],
        jnp.float32,
    )
    chex.assert_shape(routing.router_probs, (6, 4))


def test_renormalized_combine_weights_sum_to_one() -> None:
    routing = softmax_top_k(key_logits(16, 8), top_k=3)
    np.testing.assert_allclose(jnp.sum(routing.combine_weights, axis=-1), 1.0, rtol=1e-6)


def test_unnormalized_combine_weights_are_the_router_probs() -> None:
    routing = softmax_top_k(key_logits(16, 8), top_k=3, renormalize=False)
    chosen = jnp.take_along_axis(routing.router_probs, routing.expert_index, axis=-1)
    np.testing.assert_array_equal(routing.combine_weights, chosen)
    np.testing.assert_allclose(jnp.sum(routing.router_probs, axis=-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("top_k", [0, 5])
def test_softmax_top_k_rejects_top_k_out_of_range(top_k: int) -> None:
    with pytest.raises(ValueError, match=rf"top_k: got {top_k}; allowed: 1 <= top_k"):
        softmax_top_k(key_logits(3, 4), top_k=top_k)


def test_softmax_top_k_is_registered_and_jits() -> None:
    assert "softmax_top_k" in ROUTERS
    router = get_router_spec("softmax_top_k").route
    assert router is softmax_top_k
    routing = jax.jit(router, static_argnames="top_k")(key_logits(5, 4), top_k=2)
    assert isinstance(routing, Routing)
    assert set(routing.aux_losses) == {"load_balance", "router_z"}
