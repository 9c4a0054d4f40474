"""The arms of `run_seed`, checked at the weights each training run starts from.

Every call of `Trainer.train` is recorded; the records of `run_seed` name each call's arm.
Ticket: the rewind point (the initialisation, or the dense run's weights after `rewind_step`
updates) under the round's masks, the masks pruned from the previous ticket's trained weights.
Reinit: the ticket's masks with weights drawn afresh, so every kept kernel entry differs from
the initialisation. Random: the rewind point under random masks of the ticket's per-layer counts.
"""

import functools

import jax
import numpy as np
import pytest
from flax import nnx

from moejax.models import small
from moejax.pruning.lottery import layer_rates, magnitude_round
from moejax.pruning.masks import path_name
from moejax.pruning.optax_wrapper import find_prune_state
from moejax.tasks import lottery

ROUNDS = 2


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.random((16, 28, 28, 1), np.float32),
        rng.integers(0, 10, 16).astype(np.int32),
        rng.random((8, 28, 28, 1), np.float32),
        rng.integers(0, 10, 8).astype(np.int32),
    )


@functools.cache
def _run(rewind_step):
    """({(round, arm): (start params, masks, trained params, opt state)}, initial params)."""
    calls = []
    train = lottery.Trainer.train

    def spy(self, params, masks, key):
        trained, opt_state, metrics = train(self, params, masks, key)
        calls.append((params, masks, trained, opt_state))
        return trained, opt_state, metrics

    config = lottery.LotteryConfig(
        rounds=ROUNDS, epochs=1, batch_size=8, rewind_step=rewind_step, seeds="3"
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lottery.Trainer, "train", spy)
        records = lottery.run_seed(config, _data(), seed=3, log=lambda line: None)
    assert [(r["round"], r["arm"]) for r in records] == [(0, "ticket")] + [
        (r, arm) for r in range(1, ROUNDS + 1) for arm in lottery.ARMS
    ]
    init_key = jax.random.split(jax.random.key(3), 4)[0]
    init = nnx.to_pure_dict(nnx.state(small.make_model("lenet", init_key)))
    arms = {(r["round"], r["arm"]): call for r, call in zip(records, calls, strict=True)}
    return arms, init


def _pairs(*trees):
    """Leaf tuples with their path names."""
    named = jax.tree_util.tree_leaves_with_path(trees[0])
    rest = [jax.tree.leaves(t) for t in trees[1:]]
    for i, (path, leaf) in enumerate(named):
        yield (path_name(path), np.asarray(leaf), *(np.asarray(r[i]) for r in rest))


def _assert_equal_under_masks(params, reference, masks):
    for name, p, ref, m in _pairs(params, reference, masks):
        np.testing.assert_array_equal(p[m], ref[m], err_msg=name)


@pytest.mark.parametrize("rewind_step", [0, 1])
def test_ticket_restarts_from_the_rewind_point_under_masks_pruned_from_its_trained_weights(
    rewind_step,
):
    arms, init = _run(rewind_step)
    dense_start, dense_masks, dense_trained, dense_state = arms[0, "ticket"]
    assert all(bool(np.all(m)) for m in jax.tree.leaves(dense_masks))
    _assert_equal_under_masks(dense_start, init, dense_masks)
    rewind_point = find_prune_state(dense_state).rewind_params
    if rewind_step == 0:
        _assert_equal_under_masks(rewind_point, init, dense_masks)
    else:
        moved = [not np.array_equal(r, i) for _, r, i in _pairs(rewind_point, init)]
        assert any(moved), "a late rewind point must differ from the initialisation"
    rates = layer_rates(init, 0.2, 0.1, output_layer=small.OUTPUT_LAYER)
    previous_masks, previous_trained = dense_masks, dense_trained
    for round_index in range(1, ROUNDS + 1):
        start, masks, trained, _ = arms[round_index, "ticket"]
        want_masks = magnitude_round(previous_trained, previous_masks, rates)
        for name, m, want in _pairs(masks, want_masks):
            np.testing.assert_array_equal(m, want, err_msg=name)
        _assert_equal_under_masks(start, rewind_point, masks)
        previous_masks, previous_trained = masks, trained


def test_reinit_control_keeps_the_ticket_masks_but_no_initial_weight():
    arms, init = _run(rewind_step=0)
    for round_index in range(1, ROUNDS + 1):
        _, ticket_masks, _, _ = arms[round_index, "ticket"]
        start, masks, _, _ = arms[round_index, "reinit"]
        for name, m, want in _pairs(masks, ticket_masks):
            np.testing.assert_array_equal(m, want, err_msg=name)
        for name, p, i, m in _pairs(start, init, masks):
            assert p.shape == i.shape, name
            if name.endswith("/kernel"):  # biases start at zero in every initialisation
                assert np.all(p[m] != i[m]), f"{name}: re-init repeats initial weights"


def test_random_control_keeps_the_initial_weights_under_random_masks_of_equal_counts():
    arms, init = _run(rewind_step=0)
    for round_index in range(1, ROUNDS + 1):
        _, ticket_masks, _, _ = arms[round_index, "ticket"]
        start, masks, _, _ = arms[round_index, "random"]
        _assert_equal_under_masks(start, init, masks)
        for name, m, ticket in _pairs(masks, ticket_masks):
            assert int(m.sum()) == int(ticket.sum()), name
            if name.endswith("/kernel") and not ticket.all():
                assert not np.array_equal(m, ticket), f"{name}: random masks equal the ticket's"
