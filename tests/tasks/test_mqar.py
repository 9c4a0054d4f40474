"""The MQAR task: the generator's invariants and the routing recall it measures."""

import jax.numpy as jnp
import numpy as np
import pytest

from moejax.tasks.mqar import MQARConfig, mqar_batch
from moejax.tasks.mqar_train import routing_recall


def test_mqar_queries_ask_for_the_value_of_an_earlier_pair():
    config = MQARConfig(length=128, num_pairs=8, num_keys=16, num_values=16, num_noise=4)
    batch = mqar_batch(config, 4, np.random.default_rng(0))
    inputs, targets = batch["inputs"], batch["targets"]
    for b in range(4):
        keys, values = inputs[b, 0:16:2], inputs[b, 1:16:2]
        assert len(set(keys.tolist())) == 8 and np.all(keys < 16)
        assert np.all((values >= 16) & (values < 32))
        queries = np.flatnonzero(batch["loss_mask"][b])
        assert queries.size == 8 and np.all(queries >= 16)
        for p in queries:
            pair = batch["pair_position"][b, p]
            assert inputs[b, pair] == inputs[b, p]  # the query repeats the pair's key
            assert targets[b, p] == inputs[b, pair + 1]  # and asks for its value
        rest = np.setdiff1d(np.arange(16, 128), queries)
        assert np.all(inputs[b, rest] >= 32)  # only noise elsewhere


def test_mqar_spread_layout_puts_pairs_in_first_half_and_queries_in_second():
    config = MQARConfig(length=128, num_pairs=8, num_keys=16, num_values=16, layout="spread")
    batch = mqar_batch(config, 4, np.random.default_rng(1))
    inputs, targets = batch["inputs"], batch["targets"]
    for b in range(4):
        queries = np.flatnonzero(batch["loss_mask"][b])
        pairs = batch["pair_position"][b, queries]
        assert queries.size == 8 and np.all(queries >= 64)
        assert np.all(pairs < 64) and np.all(pairs % 2 == 0)
        assert len(set(pairs.tolist())) == 8
        np.testing.assert_array_equal(inputs[b, pairs], inputs[b, queries])
        np.testing.assert_array_equal(inputs[b, pairs + 1], targets[b, queries])
        assert len(set(inputs[b, queries].tolist())) == 8  # distinct keys


def test_mqar_rejects_more_pairs_than_keys():
    with pytest.raises(ValueError, match="num_pairs=20 exceeds num_keys=16"):
        MQARConfig(num_pairs=20, num_keys=16)


def test_routing_recall_counts_queries_whose_value_block_is_visited():
    batch = {
        "inputs": np.zeros((1, 8), np.int32),
        "loss_mask": np.array([[0, 0, 0, 0, 1, 0, 1, 1]], bool),
        "pair_position": np.array([[-1, -1, -1, -1, 0, -1, 2, 4]], np.int32),
    }
    # blocks of 2: query blocks 2 and 3; value tokens at 1 (block 0), 3 (block 1), 5 (block 2)
    mask = np.zeros((1, 2, 4, 4), bool)
    mask[0, 0, 2, 0] = True  # query at 4 sees the block of value 1
    mask[0, 1, 3, 2] = True  # query at 7 sees the block of value 5 (another head)
    assert float(routing_recall(jnp.asarray(mask), batch, 2, 2)) == pytest.approx(2 / 3)
