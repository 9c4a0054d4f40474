"""The hash router: experts from a hash of the token id, gates uniform or from the softmax."""

import jax
import jax.numpy as jnp
import numpy as np

from moejax.routers.hash_layer import hash_router
from tests.routers.routing_helpers import normal_logits


def test_token_id_routers_softmax_gates() -> None:
    ids = jnp.arange(8, dtype=jnp.int32)
    logits = normal_logits(8, 4)
    routed = hash_router(logits, top_k=2, token_ids=ids, gate="softmax", renormalize=False)
    chosen = jnp.take_along_axis(jax.nn.softmax(logits), routed.expert_index, axis=-1)
    np.testing.assert_allclose(routed.combine_weights, chosen, rtol=1e-6)
    renormalized = hash_router(logits, top_k=2, token_ids=ids, gate="softmax")
    np.testing.assert_allclose(
        renormalized.combine_weights, chosen / chosen.sum(-1)[:, None], rtol=1e-6
    )
