"""One-shot calibrated pruning of the LM's feed-forwards, block after block, routing-aware."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from small_lm import small_lm

from moejax.config import MoEConfig
from moejax.models.moe_layer import RouterContext
from moejax.models.transformer import TransformerLM
from moejax.pruning.one_shot import sparsegpt, wanda_mask
from moejax.training.calibrated_pruning import prune_feed_forwards

CONFIG = small_lm(MoEConfig(every=1, num_experts=4, top_k=1, expert_d_ff=16, num_shared_experts=1))


def _calibration(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 64, (4, 16)).astype(np.int32) for _ in range(3)]


def test_each_expert_is_calibrated_on_its_own_tokens_only():
    """Block 0's experts: Wanda masks from the norms of exactly the tokens routed to each."""
    model = TransformerLM(CONFIG, rngs=nnx.Rngs(0))
    # Inputs whose features differ in size, so Wanda's choice is not magnitude's.
    spread = jnp.exp(jax.random.normal(jax.random.key(5), (CONFIG.d_model,)))
    model.blocks[0].ffn_norm.scale[...] = spread
    calibration = _calibration()
    dense = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    xs, routed = [], []
    for tokens in calibration:
        _, outputs = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(
            jnp.asarray(tokens), train=False
        )
        x = outputs["blocks"][0]["ffn_norm"]["__call__"].get_value()[0]
        index = model.blocks[0].ffn.route(
            x, RouterContext(token_ids=jnp.asarray(tokens)), train=False
        )
        xs.append(np.asarray(x).reshape(-1, 32))
        routed.append(np.asarray(index.expert_index)[:, 0])
    x, routed = np.concatenate(xs), np.concatenate(routed)
    report = prune_feed_forwards(model, calibration, method="wanda", sparsity=0.5)
    assert report["block0"]["expert_tokens"] == [int((routed == e).sum()) for e in range(4)]
    for expert in range(4):
        if not (routed == expert).any():
            continue
        mine = x[routed == expert]
        w = dense["blocks"][0]["ffn"]["w_gate"][expert]
        expected = np.asarray(wanda_mask(jnp.asarray(w), jnp.asarray((mine**2).sum(0)), 0.5))
        pruned = np.asarray(model.blocks[0].ffn.w_gate[...][expert])
        np.testing.assert_array_equal(pruned != 0, expected)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_every_feed_forward_weight_loses_its_share(nm):
    model = TransformerLM(
        dataclasses.replace(CONFIG, moe=dataclasses.replace(CONFIG.moe, every=2)),
        rngs=nnx.Rngs(1),
    )
    walked = []
    prune_feed_forwards(
        model,
        _calibration(),
        method="sparsegpt",
        sparsity=0.5,
        nm=nm,
        progress=lambda blocks: walked.extend(layer for layer, _ in blocks) or blocks,
    )
    assert walked == [0, 1]  # the progress wrapper sees every block, in order
    for block in model.blocks:
        for name in ("w_gate", "w_up", "w_down"):
            w = np.asarray(getattr(block.ffn, name)[...])
            assert abs(np.mean(w == 0) - 0.5) < 0.02, name
            if nm is not None and w.ndim == 2:
                assert np.all((w.reshape(-1, 4, w.shape[-1]) != 0).sum(1) <= 2)
    router = np.asarray(model.blocks[1].ffn.router[...])
    assert np.all(router != 0)  # routers stay dense


def test_sparsegpt_keeps_the_logits_closer_than_magnitude():
    calibration, held_out = _calibration(0), jnp.asarray(_calibration(1)[0])
    reference = TransformerLM(CONFIG, rngs=nnx.Rngs(2))
    expected = np.asarray(reference(held_out, train=False)[0])
    errors, layer_errors = {}, {}
    for method in ("magnitude", "sparsegpt"):
        model = TransformerLM(CONFIG, rngs=nnx.Rngs(2))
        report = prune_feed_forwards(model, calibration, method=method, sparsity=0.6)
        errors[method] = np.abs(np.asarray(model(held_out, train=False)[0]) - expected).mean()
        layer_errors[method] = [report[block]["layer_error"] for block in ("block0", "block1")]
    assert errors["sparsegpt"] < errors["magnitude"]
    pairs = zip(layer_errors["sparsegpt"], layer_errors["magnitude"], strict=True)
    assert all(0 < s < m < 1 for s, m in pairs)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_dsnot_refines_each_methods_mask_and_the_method_rebuilds_the_weights(method):
    """Block 0's dense MLP, 2:4: the refined gate mask stays 2:4, lowers every output's
    expected error |E[x] (w - w')| below the unrefined mask's, and the weights are the
    method's for that mask (SparseGPT compensates for it, Wanda zeroes it)."""
    config = dataclasses.replace(CONFIG, moe=dataclasses.replace(CONFIG.moe, every=2))
    calibration = _calibration(3)
    models = {refine: TransformerLM(config, rngs=nnx.Rngs(4)) for refine in (None, "dsnot")}
    w = np.asarray(models[None].blocks[0].ffn.w_gate[...], np.float64)
    xs = []
    for tokens in calibration:
        _, outputs = nnx.capture(models[None], nnx.Intermediate, method_outputs=nnx.Intermediate)(
            jnp.asarray(tokens), train=False
        )
        xs.append(np.asarray(outputs["blocks"][0]["ffn_norm"]["__call__"].get_value()[0]))
    x = np.concatenate(xs).reshape(-1, config.d_model).astype(np.float64)
    for refine, model in models.items():
        prune_feed_forwards(
            model, calibration, method=method, sparsity=0.5, nm=(2, 4), refine=refine
        )
    plain = np.asarray(models[None].blocks[0].ffn.w_gate[...]) != 0
    refined = np.asarray(models["dsnot"].blocks[0].ffn.w_gate[...])
    mask = refined != 0
    assert np.all(mask.reshape(-1, 4, mask.shape[1]).sum(1) == 2)
    assert not np.array_equal(mask, plain)

    def expected_error(kept):
        return np.abs(x.mean(0) @ np.where(kept, 0.0, w))

    assert np.all(expected_error(mask) <= expected_error(plain) + 1e-5)
    assert expected_error(mask).sum() < 0.7 * expected_error(plain).sum()
    if method == "wanda":
        np.testing.assert_array_equal(refined, np.where(mask, w, 0.0).astype(np.float32))
    else:
        rebuilt, _ = sparsegpt(
            jnp.asarray(w, jnp.float32),
            jnp.asarray(x.T @ x, jnp.float32),
            0.0,
            mask=jnp.asarray(mask),
        )
        np.testing.assert_allclose(refined, rebuilt, rtol=2e-3, atol=2e-4)
    with pytest.raises(ValueError, match="refine: got 'owl'"):
        prune_feed_forwards(models[None], calibration, method=method, sparsity=0.5, refine="owl")


def test_armor_through_the_driver_beats_sparsegpt_on_the_layer_loss():
    """2:4 on block 0's dense MLP: ARMOR's stored weight (the product P S Q) reconstructs the
    gate projection's outputs on the calibration tokens better than SparseGPT's does."""
    config = dataclasses.replace(CONFIG, num_layers=1, moe=dataclasses.replace(CONFIG.moe, every=2))
    calibration = _calibration(5)
    models = {m: TransformerLM(config, rngs=nnx.Rngs(6)) for m in ("sparsegpt", "armor")}
    w = np.asarray(models["armor"].blocks[0].ffn.w_gate[...], np.float64)
    capture = nnx.capture(models["armor"], nnx.Intermediate, method_outputs=nnx.Intermediate)
    x = np.concatenate(
        [
            np.asarray(
                capture(jnp.asarray(t), train=False)[1]["blocks"][0]["ffn_norm"][
                    "__call__"
                ].get_value()[0]
            )
            for t in calibration
        ]
    ).reshape(-1, config.d_model)
    losses = {}
    for method, model in models.items():
        prune_feed_forwards(model, calibration, method=method, sparsity=0.5, nm=(2, 4))
        pruned = np.asarray(model.blocks[0].ffn.w_gate[...], np.float64)
        losses[method] = np.sum((x @ w - x @ pruned) ** 2)
    assert losses["armor"] < 0.9 * losses["sparsegpt"]
    with pytest.raises(ValueError, match="nm: got None"):
        prune_feed_forwards(models["armor"], calibration, method="armor", sparsity=0.5)
