"""What the token-id routers (hash, random_fixed) share in routers/hashing.py: the hash, and
routing that depends on nothing but the token id."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.routers._hashing import hash_expert_index
from moejax.routers.hash_layer import hash_router
from moejax.routers.random_fixed import random_fixed
from tests.routers.routing_helpers import normal_logits


def _mix32_reference(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64) & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


@pytest.mark.parametrize("router", [hash_router, random_fixed])
def test_token_id_routers_give_a_token_the_same_experts_everywhere(router) -> None:
    top_k, experts = 2, 5
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 40, size=n) for n in (30, 17)]
    seen: dict[int, tuple[int, ...]] = {}
    for seed, ids in enumerate(batches):
        # Different logits, positions and batch sizes: only the id may matter.
        routed = router(normal_logits(len(ids), experts, seed=seed), top_k=top_k, token_ids=ids)
        chex.assert_type(routed.expert_index, jnp.int32)
        for token_id, experts_of_token in zip(ids, np.asarray(routed.expert_index), strict=True):
            assert len(set(experts_of_token)) == top_k
            assert seen.setdefault(int(token_id), tuple(experts_of_token)) == tuple(
                experts_of_token
            )
        np.testing.assert_array_equal(routed.combine_weights, 1.0 / top_k)
        assert float(routed.aux_losses["load_balance"]) == 0.0


def test_hash_matches_numpy_hash_and_spreads_ids_evenly() -> None:
    experts, seed = 4, 3
    ids = np.arange(4096)
    salt = _mix32_reference(np.array([seed + 0x9E3779B9]))
    keys = _mix32_reference(ids.astype(np.uint64) ^ salt)
    scores = _mix32_reference(keys[:, None] + np.arange(experts))
    expected = np.argmax(scores, axis=-1)
    index = hash_expert_index(jnp.asarray(ids, jnp.int32), experts, 1, seed)
    np.testing.assert_array_equal(index[:, 0], expected)
    load = np.bincount(expected, minlength=experts) / len(ids)
    np.testing.assert_allclose(load, 1 / experts, atol=0.03)
    assert np.mean(expected != np.asarray(hash_expert_index(jnp.asarray(ids), 4, 1, 0))[:, 0]) > 0.5


@pytest.mark.parametrize("router", [hash_router, random_fixed])
def test_token_id_routers_reject_missing_or_bad_token_ids(router) -> None:
    with pytest.raises(ValueError, match=r"token_ids: got None; allowed: an int array"):
        router(normal_logits(4, 4), top_k=1)
    with pytest.raises(ValueError, match=r"token_ids: got 'int32\[3\]'"):
        router(normal_logits(4, 4), top_k=1, token_ids=jnp.arange(3))
    with pytest.raises(ValueError, match=r"gate: got 'x'; allowed: uniform, softmax"):
        router(normal_logits(4, 4), top_k=1, token_ids=jnp.arange(4), gate="x")
