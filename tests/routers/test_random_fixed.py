"""The random-fixed router: experts from a random table over the vocabulary, drawn once from a
seed."""

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.routers.random_fixed import random_fixed
from tests.routers.routing_helpers import normal_logits


def test_random_fixed_tables_depend_on_the_seed() -> None:
    ids = jnp.arange(256, dtype=jnp.int32)
    logits = normal_logits(256, 8)
    first = random_fixed(logits, top_k=2, token_ids=ids, table_seed=0).expert_index
    again = random_fixed(logits, top_k=2, token_ids=ids, table_seed=0).expert_index
    other = random_fixed(logits, top_k=2, token_ids=ids, table_seed=1).expert_index
    np.testing.assert_array_equal(first, again)
    assert np.mean(np.asarray(first != other)) > 0.5
    # Ids wrap modulo vocab_size.
    wrapped = random_fixed(logits[:4], top_k=2, token_ids=jnp.array([256, 257, 258, -1]))
    np.testing.assert_array_equal(wrapped.expert_index, first[jnp.array([0, 1, 2, 255])])


def test_random_fixed_rejects_bad_vocab_size() -> None:
    with pytest.raises(ValueError, match=r"vocab_size: got 0; allowed: an int >= 1"):
        random_fixed(normal_logits(4, 4), top_k=1, token_ids=jnp.arange(4), vocab_size=0)
