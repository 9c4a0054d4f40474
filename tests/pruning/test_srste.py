"""SR-STE gradients against the hand-computed formula, gradient-flow decay, SAD."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.pruning import srste as nm


def _nm_mask_reference(w, n, m):
    """N:M mask along axis 0 by a loop over groups (float64 numpy)."""
    mask = np.zeros(w.shape, bool)
    for start in range(0, w.shape[0], m):
        for col in range(w.shape[1]):
            group = np.abs(w[start : start + m, col])
            mask[start + np.argsort(-group, kind="stable")[:n], col] = True
    return mask


@pytest.mark.parametrize("flow", [1.0, 0.3])
def test_srste_gradient_is_masked_grad_plus_decayed_flow_plus_refine_term(flow):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 3))
    x = rng.normal(size=(5, 8))
    decay = 0.01

    def loss(w):
        sparse = nm.srste_sparsify(w, 2, 4, 0, jnp.float32(decay), jnp.float32(flow))
        return jnp.sum(jnp.asarray(x, jnp.float32) @ sparse)

    w32 = jnp.asarray(w, jnp.float32)
    mask = _nm_mask_reference(w, 2, 4)
    forward = np.asarray(nm.srste_sparsify(w32, 2, 4, 0, jnp.float32(decay), jnp.float32(flow)))
    assert np.allclose(forward, np.where(mask, w, 0.0), atol=1e-6)
    g = np.broadcast_to(x.sum(axis=0)[:, None], w.shape)  # dL/d(sparse W)
    want = np.where(mask, g, flow * g) + decay * (~mask) * w
    assert np.allclose(np.asarray(jax.grad(loss)(w32)), want, rtol=1e-5, atol=1e-6)


def test_srste_params_only_touch_prunable_leaves():
    params = {"kernel": jnp.arange(16.0).reshape(8, 2) - 7.5, "bias": jnp.arange(2.0)}
    out = nm.srste_params(params, {"kernel": True, "bias": False}, n=1, m=4)
    assert np.array_equal(np.asarray(out["bias"]), [0.0, 1.0])
    groups = np.asarray(out["kernel"]).reshape(2, 4, 2)
    assert ((groups != 0).sum(axis=1) == 1).all()


def test_gradient_flow_decay_steps_from_one_to_zero():
    beta = nm.gradient_flow_decay(
        jnp.array([0, 99, 100, 149, 150, 199, 200, 500]), begin=100, end=200, intervals=2
    )
    assert np.asarray(beta) == pytest.approx([1, 1, 1, 1, 0.5, 0.5, 0, 0])


def test_sad_counts_mask_flips():
    before = {"a": jnp.array([True, False, True, True]), "b": jnp.ones((2, 2), bool)}
    after = {"a": jnp.array([False, True, True, True]), "b": jnp.ones((2, 2), bool)}
    report = nm.sparse_architecture_divergence(before, after)
    assert report["a"] == 0.5 and report["b"] == 0.0
    assert report["flips"] == 2 and report["total"] == pytest.approx(2 / 8)


def test_srste_training_fits_and_gradient_flow_decay_settles_the_mask():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(128, 16)), jnp.float32)
    true = _nm_mask_reference(rng.normal(size=(16, 4)), 2, 4) * rng.normal(size=(16, 4)) * 3
    y = x @ jnp.asarray(true, jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 4)) * 0.1, jnp.float32)

    def loss(w, flow):
        sparse = nm.srste_sparsify(w, 2, 4, 0, jnp.float32(0.1), flow)
        return jnp.mean((x @ sparse - y) ** 2)

    step = jax.jit(lambda w, flow: w - 0.05 * jax.grad(loss)(w, flow))
    flips, losses = [], []
    previous = nm.nm_masks({"w": w}, {"w": True}, n=2, m=4)
    for t in range(300):
        w = step(w, nm.gradient_flow_decay(t, begin=100, end=250, intervals=5))
        masks = nm.nm_masks({"w": w}, {"w": True}, n=2, m=4)
        flips.append(nm.sparse_architecture_divergence(previous, masks)["flips"])
        losses.append(float(loss(w, 1.0)))
        previous = masks
    # SAD: the topology moves early and settles once the refine term has pulled the pruned
    # weights towards zero and the gradient flow to them is cut off.
    assert np.mean(flips[250:]) < 0.25 * np.mean(flips[:100])
    assert np.median(losses[-20:]) < 0.01 * float(jnp.mean(y**2))


def test_the_registered_method_forwards_srste_weights_trains_dense_and_records_nm_masks():
    from moejax.pruning import Pruner, get_method
    from moejax.pruning.patterns import NMOptions
    from moejax.pruning.srste import SRSTEOptions

    rng = np.random.default_rng(4)
    params = {"w": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32), "b": jnp.ones(4)}
    prunable = {"w": True, "b": False}
    masks = jax.tree.map(lambda p: jnp.zeros(p.shape, bool), params)  # ignored by SR-STE
    pruner = Pruner(pattern="nm", pattern_options=NMOptions(n=1, m=4, axis=0))
    spec, options = get_method("srste"), SRSTEOptions(decay=0.1, flow_begin=0, flow_end=10)
    step = jnp.int32(5)

    def forward(p):
        return spec.forward(p, masks, step=step, pruner=pruner, prunable=prunable, options=options)

    def expected(p):
        flow = nm.gradient_flow_decay(step, begin=0, end=10)
        return nm.srste_params(p, prunable, n=1, m=4, axis=0, decay=0.1, flow=flow)

    np.testing.assert_array_equal(forward(params)["w"], expected(params)["w"])
    # A linear loss: its gradient reaches the pruned weights scaled by the decayed flow.
    weights = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
    got = jax.grad(lambda p: jnp.sum(forward(p)["w"] * weights))(params)
    want = jax.grad(lambda p: jnp.sum(expected(p)["w"] * weights))(params)
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)
    assert float(jnp.abs(got["w"]).min()) > 0  # straight through: every weight gets a gradient
    released = spec.optimizer_masks(masks, params=params, options=options)
    assert all(bool(m.all()) for m in jax.tree.leaves(released))
    recorded = spec.record(masks, params=params, pruner=pruner, prunable=prunable, options=options)
    np.testing.assert_array_equal(recorded["w"], nm.nm_masks(params, prunable, n=1, m=4)["w"])
    assert bool(recorded["b"].all())
    assert spec.requires == {"pattern": "nm", "score": "magnitude", "schedule": "none"}
