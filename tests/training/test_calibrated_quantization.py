"""Post-training fake quantisation of the LM's feed-forwards, block after block, routing-aware."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from small_lm import small_lm

from moejax.config import MoEConfig
from moejax.models.moe_layer import RouterContext
from moejax.models.transformer import TransformerLM
from moejax.pruning.one_shot import LayerStatistics, accumulate
from moejax.quantization import dequantize, fake_quant, gptq_quantize, quantize
from moejax.training.calibrated_quantization import quantize_feed_forwards, smooth_model

# Block 0 a dense MLP, block 1 MoE (top-2 of 4 experts, one gated shared expert), so the MoE
# block is calibrated on the outputs of an already quantised block.
CONFIG = small_lm(
    MoEConfig(
        every=2,
        num_experts=4,
        top_k=2,
        expert_d_ff=16,
        num_shared_experts=1,
        shared_expert_gate=True,
    )
)
GROUP = 16
FFN_WEIGHTS = {
    0: ("w_gate", "w_up", "w_down"),
    1: ("w_gate", "w_up", "w_down", "shared_w_gate", "shared_w_up", "shared_w_down"),
}


def _calibration(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 64, (4, 16)).astype(np.int32) for _ in range(3)]


def _model() -> TransformerLM:
    """A model with trained-like traits: outlier input channels (what smoothing moves into the
    weights), a decisive router (an untrained one is near uniform) and an open shared gate."""
    model = TransformerLM(CONFIG, rngs=nnx.Rngs(0))
    spread = jnp.exp(jax.random.normal(jax.random.key(5), (CONFIG.d_model,)))
    for block in model.blocks:
        block.ffn_norm.scale[...] = spread
    ffn = model.blocks[1].ffn
    ffn.router[...] = ffn.router[...] * 50
    ffn.shared_gate[...] = jax.random.normal(jax.random.key(6), (CONFIG.d_model,))
    return model


def _params(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@functools.cache
def _quantized(method: str, bits: int, mixed: bool = False, sparsity: float = 0.0):
    """(float params, quantised params, report, quantised model), computed once per setting."""
    model = _model()
    before = _params(model)
    report = quantize_feed_forwards(
        model,
        _calibration(),
        method=method,
        bits=bits,
        group_size=GROUP,
        mixed=mixed,
        sparsity=sparsity,
    )
    return before, _params(model), report, model


def _groups(w: np.ndarray) -> np.ndarray:
    """`[..., d_in, d_out]` -> `[..., d_out, groups, GROUP]`: each group's weights last."""
    *lead, d_in, d_out = w.shape
    return np.moveaxis(w.reshape(*lead, d_in // GROUP, GROUP, d_out), -1, -3)


def _most_distinct(w: np.ndarray) -> int:
    """The largest number of distinct values in any one group of `w`."""
    ordered = np.sort(_groups(w), axis=-1)
    return int((1 + np.sum(np.diff(ordered, axis=-1) != 0, axis=-1)).max())


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_every_feed_forward_weight_lies_on_its_groups_grid(method):
    """Codes `w_hat / scale` (the scales of the float weight's groups) are integers within the
    symmetric range; attention, embeddings, norms and the float router are untouched."""
    bits = 4
    high = 2 ** (bits - 1) - 1
    before, after, _, _ = _quantized(method, bits)
    for layer, names in FFN_WEIGHTS.items():
        for name in names:
            w = before["blocks"][layer]["ffn"][name]
            w_hat = after["blocks"][layer]["ffn"][name]
            scales = np.asarray(quantize(jnp.asarray(w), bits, GROUP).scales)
            codes = w_hat / np.repeat(scales, GROUP, axis=-2)
            np.testing.assert_allclose(codes, np.round(codes), atol=1e-3, err_msg=name)
            assert np.abs(np.round(codes)).max() <= high, name
            assert _most_distinct(w_hat) <= 2**bits - 1, name
            assert not np.array_equal(w, w_hat), name
            if method == "rtn":  # re-quantising a grid point gives it back
                again = np.asarray(fake_quant(jnp.asarray(w_hat), bits, GROUP))
                np.testing.assert_allclose(again, w_hat, rtol=1e-6, atol=1e-7, err_msg=name)
    untouched = jax.tree.map(np.array_equal, before, after)
    untouched["blocks"][0].pop("ffn")
    ffn = untouched["blocks"][1].pop("ffn")
    assert ffn["router"] and ffn["shared_gate"]
    assert all(jax.tree.leaves(untouched))


def test_eight_bits_keep_the_logits_and_the_routing_better_than_three():
    held_out = jnp.asarray(_calibration(1)[0])
    expected = np.asarray(_model()(held_out, train=False)[0])
    agreement, errors = {}, {}
    for bits in (3, 8):
        _, _, report, model = _quantized("rtn", bits)
        agreement[bits] = report["mean_agreement"]
        assert report["block1"]["agreement"] == agreement[bits]
        errors[bits] = np.abs(np.asarray(model(held_out, train=False)[0]) - expected)
    # A token whose second expert flips moves further; the rest stay within rounding.
    assert errors[8].max() < 0.05 * np.abs(expected).max()
    assert errors[8].mean() < 0.1 * errors[3].mean()
    assert agreement[8] >= 0.99
    assert agreement[8] > agreement[3]
    assert (
        _quantized("rtn", 8)[2]["block1"]["router_kl"]
        < _quantized("rtn", 3)[2]["block1"]["router_kl"]
    )


def test_smoothing_folds_into_the_norm_exactly():
    """EAQuant's smoothing alone: every block's norm and input weights change, the float model's
    logits do not."""
    model = _model()
    before = _params(model)
    tokens = jnp.asarray(_calibration(1)[0])
    expected = np.asarray(model(tokens, train=False)[0])
    scales = smooth_model(model, _calibration())
    after = _params(model)
    for layer in (0, 1):
        assert not np.allclose(scales[layer], 1.0)
        np.testing.assert_allclose(
            after["blocks"][layer]["ffn_norm"]["scale"] * scales[layer],
            before["blocks"][layer]["ffn_norm"]["scale"],
            rtol=1e-6,
        )
    ffn = after["blocks"][1]["ffn"]
    for name in ("router", "w_gate", "shared_w_up", "shared_gate"):
        assert not np.allclose(ffn[name], before["blocks"][1]["ffn"][name]), name
    np.testing.assert_array_equal(ffn["w_down"], before["blocks"][1]["ffn"]["w_down"])
    logits = np.asarray(model(tokens, train=False)[0])
    np.testing.assert_allclose(logits, expected, atol=1e-5 * np.abs(expected).max())


def test_gptq_reconstructs_the_calibration_outputs_better_than_rounding():
    """Block 0 sees the same inputs in both runs: GPTQ's error is lower for every weight; in
    the MoE block (its inputs differ by block 0's errors) lower on average."""
    rtn, gptq = _quantized("rtn", 3)[2], _quantized("gptq", 3)[2]
    for name, error in gptq["block0"]["errors"].items():
        assert error < rtn["block0"]["errors"][name], name
    for name, errors in gptq["block1"]["errors"].items():
        assert np.mean(errors) < np.mean(rtn["block1"]["errors"][name]), name


def test_each_expert_is_calibrated_on_its_own_tokens():
    """Block 1's experts: GPTQ with the Hessian of exactly the tokens the float router sends
    each (the router stays float, so the final model's routing is the calibration's), the down
    projection on the hidden activations of the quantised gate and up."""
    bits = 4
    before, after, report, model = _quantized("gptq", bits)
    xs, masks = [], []
    for tokens in _calibration():
        _, outputs = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(
            jnp.asarray(tokens), train=False
        )
        x = outputs["blocks"][1]["ffn_norm"]["__call__"].get_value()[0]
        index = model.blocks[1].ffn.route(x, RouterContext(token_ids=tokens), train=False)
        xs.append(x.reshape(-1, CONFIG.d_model).astype(jnp.float32))
        masks.append(index.expert_index)
    counts = [int(sum(np.any(np.asarray(m) == e, axis=1).sum() for m in masks)) for e in range(4)]
    assert report["block1"]["expert_tokens"] == counts
    assert min(counts) > 0 and max(counts) < 3 * 64
    ffn_before, ffn_after = before["blocks"][1]["ffn"], after["blocks"][1]["ffn"]
    for expert in range(4):
        # The down projection reads the hidden activations of the quantised gate and up.
        gate, up = ffn_after["w_gate"][expert], ffn_after["w_up"][expert]
        stats = {
            "w_gate": LayerStatistics.zeros(CONFIG.d_model),
            "w_down": LayerStatistics.zeros(16),
        }
        for x, index in zip(xs, masks, strict=True):
            mine = jnp.any(index == expert, axis=1)
            stats["w_gate"] = accumulate(stats["w_gate"], x, mine)
            hidden = jax.nn.silu(x @ gate) * (x @ up)
            stats["w_down"] = accumulate(stats["w_down"], hidden, mine)
        for name, name_stats in stats.items():
            w = jnp.asarray(ffn_before[name][expert])
            expected = np.asarray(dequantize(gptq_quantize(w, name_stats.hessian, bits, GROUP)))
            matched = np.isclose(ffn_after[name][expert], expected, rtol=1e-5, atol=1e-6)
            assert np.mean(matched) > 0.98, (name, expert)


def test_gqsa_removes_the_requested_share_of_groups():
    sparsity, bits = 0.5, 4
    before, after, report, _ = _quantized("gqsa", bits, sparsity=sparsity)
    for layer, names in FFN_WEIGHTS.items():
        for name in names:
            w_hat = _groups(after["blocks"][layer]["ffn"][name])  # [..., d_out, groups, GROUP]
            groups = w_hat.shape[-2]
            removed = np.all(w_hat == 0, axis=-1).sum(-1)  # [..., d_out]
            assert np.all(removed == round(sparsity * groups)), name
            assert _most_distinct(after["blocks"][layer]["ffn"][name]) <= 2**bits - 1, name
    assert report["block0"]["errors"]["w_gate"] > report["block0"]["errors"]["w_down"] / 10


def test_mixed_gives_shared_experts_and_the_router_eight_bits():
    """EAQuant with QuantMoE-Bench's allocation at 3 bits: routed experts keep at most 7 values
    per group, shared experts and the (aligned) router use more of their 255."""
    bits = 3
    before, after, report, _ = _quantized("eaquant", bits, mixed=True)
    ffn = after["blocks"][1]["ffn"]
    assert report["block1"]["bits"] == {"router": 8, "shared": 8, "routed": (3, 3, 3, 3)}
    for name in ("w_gate", "w_up", "w_down"):
        assert _most_distinct(ffn[name]) <= 2**bits - 1, name
        assert 2**bits - 1 < _most_distinct(ffn[f"shared_{name}"]) <= 2**8 - 1, name
    assert 2**bits - 1 < _most_distinct(ffn["router"]) <= 2**8 - 1
    assert _most_distinct(after["blocks"][0]["ffn"]["w_gate"]) <= 2**bits - 1
    assert not np.allclose(ffn["router"], before["blocks"][1]["ffn"]["router"])
    assert report["block1"]["agreement"] > 0.9
    assert set(report["block1"]["errors"]) == {*FFN_WEIGHTS[1], "router"}


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"method": "awq"}, "method: got 'awq'"),
        ({"method": "rtn", "bits": 1}, "bits: got 1"),
        ({"method": "rtn", "group_size": 12}, "group_size: got 12"),
        ({"method": "rtn", "sparsity": 0.5}, "sparsity: got 0.5"),
        ({"method": "gqsa", "sparsity": 1.0}, "sparsity: got 1.0"),
        ({"method": "rtn", "mixed": "yes"}, "mixed: got 'yes'"),
    ],
)
def test_bad_arguments_name_the_field(options, field):
    model = _model()
    before = _params(model)
    with pytest.raises(ValueError, match=field):
        quantize_feed_forwards(model, _calibration(), **options)
    with pytest.raises(ValueError, match="calibration"):
        quantize_feed_forwards(model, [], method="rtn")
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, before, _params(model))))
