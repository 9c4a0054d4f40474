"""MaskLLM: candidate enumeration, Gumbel-softmax masks, learned masks beat random ones."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.pruning import maskllm
from moejax.pruning.patterns import nm_mask


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (1, 8)])
def test_candidates_are_every_distinct_n_of_m_mask(n, m):
    candidates = np.asarray(maskllm.candidate_masks(n, m))
    assert candidates.shape == (math.comb(m, n), m)
    assert (candidates.sum(axis=1) == n).all()
    assert len({tuple(row) for row in candidates}) == math.comb(m, n)
    want = {tuple(j in c for j in range(m)) for c in itertools.combinations(range(m), n)}
    assert {tuple(row) for row in candidates} == want


def test_soft_mask_is_a_convex_combination_with_n_mass_per_group():
    candidates = maskllm.candidate_masks(2, 4)
    logits = jax.random.normal(jax.random.key(0), (5, 6))
    soft = np.asarray(maskllm.soft_mask(logits, jax.random.key(1), candidates, 0.5, 1.0))
    assert np.allclose(soft.sum(axis=1), 2.0, atol=1e-5)
    assert soft.min() >= 0.0 and soft.max() <= 1.0 + 1e-6


def test_prior_logits_pick_the_magnitude_mask():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), jnp.float32)
    logits = maskllm.init_logits(w, 2, 4, axis=0, prior_strength=5.0)
    hard = maskllm.hard_mask(logits, maskllm.candidate_masks(2, 4), w.shape, 0)

    assert np.array_equal(np.asarray(hard), np.asarray(nm_mask(jnp.abs(w), 2, 4, 0)))


def test_learned_mask_beats_random_masks_on_toy_regression():
    rng = np.random.default_rng(2)
    d_in, d_out = 16, 8
    x = jnp.asarray(rng.normal(size=(256, d_in)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32)
    # The target uses a hidden 2:4 mask of the same frozen weights, not the magnitude mask.
    hidden = np.zeros((d_in, d_out), bool)
    for start in range(0, d_in, 4):
        for col in range(d_out):
            hidden[start + rng.choice(4, 2, replace=False), col] = True
    y = x @ jnp.where(hidden, w, 0.0)

    def loss(masked):
        return jnp.mean((x @ masked["w"] - y) ** 2)

    masks, _, losses = maskllm.learn_masks(
        loss, {"w": w}, n=2, m=4, axis=0, steps=300, learning_rate=0.1, key=jax.random.key(0)
    )
    mask = np.asarray(masks["w"])
    assert (mask.reshape(4, 4, d_out).sum(axis=1) == 2).all()
    learned = float(loss({"w": jnp.where(mask, w, 0.0)}))
    candidates = maskllm.candidate_masks(2, 4)
    random_losses = []
    for seed in range(5):
        logits = jax.random.normal(jax.random.key(seed), (d_in // 4 * d_out, 6))
        random_mask = maskllm.hard_mask(logits, candidates, w.shape, 0)
        random_losses.append(float(loss({"w": jnp.where(random_mask, w, 0.0)})))
    assert learned < 0.5 * min(random_losses)
    assert float(jnp.mean(losses[-20:])) < float(jnp.mean(losses[:20]))


def test_the_registered_method_learns_the_masks_of_the_prunable_leaves_only():
    from moejax.pruning import get_method

    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
    y = x @ jnp.where(nm_mask(-jnp.abs(w), 2, 4, 0), w, 0.0)  # the smallest two of four
    params = {"layer": {"kernel": w, "bias": jnp.ones(4)}}
    masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)

    def loss(masked):
        return jnp.mean((x @ masked["layer/kernel"] - y) ** 2)

    spec = get_method("maskllm")
    refined = spec.refine(
        params,
        masks,
        prunable={"layer": {"kernel": True, "bias": False}},
        options=spec.options(steps=200, learning_rate=0.1),
        loss_fn=loss,
        key=jax.random.key(0),
    )
    kernel = np.asarray(refined["layer"]["kernel"])
    assert (kernel.reshape(2, 4, 4).sum(axis=1) == 2).all()
    np.testing.assert_array_equal(kernel, np.asarray(nm_mask(-jnp.abs(w), 2, 4, 0)))
    assert bool(refined["layer"]["bias"].all())
