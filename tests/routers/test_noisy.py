"""Noisy top-k (`noisy_top_k`, routers/noisy.py): softmax top-k on logits plus Gaussian noise
in training, with a fixed or learned noise scale."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.routers.noisy_top_k import noisy_top_k
from moejax.routers.softmax_top_k import softmax_top_k
from tests.routers.routing_helpers import assert_same_routing, jit_router, normal_logits


def test_noisy_top_k_without_noise_is_softmax_top_k() -> None:
    logits = normal_logits(16, 6)
    expected = softmax_top_k(logits, top_k=2)
    assert_same_routing(noisy_top_k(logits, top_k=2), expected)
    # With a key but outside training there is no noise either.
    assert_same_routing(noisy_top_k(logits, top_k=2, rng=jax.random.key(0), train=False), expected)
    np.testing.assert_array_equal(
        noisy_top_k(logits, top_k=2).aux_losses["router_z"], expected.aux_losses["router_z"]
    )


def test_noise_reorders_near_ties_reproducibly() -> None:
    # Logits within 1e-3 of each other: noise of std 1/num_experts decides most choices.
    logits = normal_logits(64, 4, scale=1e-3)
    clean = softmax_top_k(logits, top_k=1).expert_index
    noisy = jit_router(noisy_top_k, "top_k")
    first = noisy(logits, top_k=1, rng=jax.random.key(1))
    again = noisy(logits, top_k=1, rng=jax.random.key(1))
    other = noisy(logits, top_k=1, rng=jax.random.key(2))
    np.testing.assert_array_equal(first.expert_index, again.expert_index)
    assert np.mean(np.asarray(first.expert_index != clean)) > 0.3
    assert np.mean(np.asarray(first.expert_index != other.expert_index)) > 0.3
    # Clearly separated logits (gaps of 10 standard deviations) are left in order.
    separated = jnp.tile(jnp.arange(4.0) * 2.5, (64, 1))
    np.testing.assert_array_equal(noisy(separated, top_k=1, rng=jax.random.key(1)).expert_index, 3)


def test_learned_noise_scale_is_softplus_of_noise_logits() -> None:
    logits = normal_logits(64, 4, scale=1e-3)
    clean = softmax_top_k(logits, top_k=1)
    key = jax.random.key(3)
    # softplus(-100) is ~4e-44: no noise whatever noise_std says.
    quiet = noisy_top_k(logits, top_k=1, rng=key, noise_std=5.0, noise_logits=logits - 100.0)
    np.testing.assert_array_equal(quiet.expert_index, clean.expert_index)
    # The noisy logits are logits + softplus(noise_logits) * N(0, 1) with the key's normals.
    noise_logits = normal_logits(64, 4, seed=5)
    routed = noisy_top_k(logits, top_k=4, rng=key, noise_logits=noise_logits)
    noisy = logits + jax.nn.softplus(noise_logits) * jax.random.normal(key, logits.shape)
    np.testing.assert_allclose(routed.router_probs, jax.nn.softmax(noisy), rtol=1e-5)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"noise_std": -1.0}, r"noise_std: got -1.0; allowed: finite and >= 0"),
        ({"noise_logits": jnp.zeros((3, 4))}, r"noise_logits.shape: got \(3, 4\)"),
    ],
)
def test_noisy_top_k_rejects_bad_options(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        noisy_top_k(normal_logits(4, 4), top_k=1, rng=jax.random.key(0), **options)
