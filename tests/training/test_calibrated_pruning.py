"""One-shot calibrated pruning of the LM's feed-forwards, block after block, routing-aware."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import ModelConfig, MoEConfig
from moejax.models.moe_layer import RouterContext
from moejax.models.transformer import TransformerLM
from moejax.pruning.one_shot import wanda_mask
from moejax.training.calibrated_pruning import prune_feed_forwards

CONFIG = ModelConfig(
    vocab_size=64,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    d_ff=48,
    max_seq_len=32,
    moe=MoEConfig(every=1, num_experts=4, top_k=1, expert_d_ff=16, num_shared_experts=1),
)


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
    prune_feed_forwards(model, _calibration(), method="sparsegpt", sparsity=0.5, nm=nm)
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
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        model = TransformerLM(CONFIG, rngs=nnx.Rngs(2))
        prune_feed_forwards(model, calibration, method=method, sparsity=0.6)
        errors[method] = np.abs(np.asarray(model(held_out, train=False)[0]) - expected).mean()
    assert errors["sparsegpt"] < errors["magnitude"]
