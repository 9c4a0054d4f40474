"""EAQuant's three steps: smoothing aggregation (function-preserving in float64, scales from
the maximum over every expert and the router, lower W4A4 error with planted outlier channels),
router alignment (higher top-k agreement than plain rounding on a planted case) and
expert-balanced calibration (every expert's quota met)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.quantization import (
    align_router,
    balanced_calibration,
    channel_absmax,
    dequantize,
    expert_aware_smoothing,
    fake_quant,
    fake_quant_activations,
    quantize,
    router_kl,
    smoothing_scales,
    topk_agreement,
)

D_MODEL, D_FF, EXPERTS, SHARED = 16, 8, 4, 1


def _params(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "router": rng.normal(size=(D_MODEL, EXPERTS)),
        "w_gate": rng.normal(size=(EXPERTS, D_MODEL, D_FF)) / 4,
        "w_up": rng.normal(size=(EXPERTS, D_MODEL, D_FF)) / 4,
        "w_down": rng.normal(size=(EXPERTS, D_FF, D_MODEL)) / 3,
        "shared_w_gate": rng.normal(size=(SHARED, D_MODEL, D_FF)) / 4,
        "shared_w_up": rng.normal(size=(SHARED, D_MODEL, D_FF)) / 4,
        "shared_w_down": rng.normal(size=(SHARED, D_FF, D_MODEL)) / 3,
        "shared_gate": rng.normal(size=D_MODEL),
    }


def _moe_reference(p, x, top_k=2):
    """A MoE layer as a loop, float64: softmax top-k routing, SwiGLU experts, gated shared."""

    def swiglu(h, gate, up, down):
        a = h @ gate
        return (a / (1 + np.exp(-a)) * (h @ up)) @ down

    logits = x @ p["router"]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e in np.argsort(-probs[t])[:top_k]:
            out[t] += probs[t, e] * swiglu(x[t], p["w_gate"][e], p["w_up"][e], p["w_down"][e])
    gate = 1 / (1 + np.exp(-(x @ p["shared_gate"])))
    for s in range(SHARED):
        shared = swiglu(x, p["shared_w_gate"][s], p["shared_w_up"][s], p["shared_w_down"][s])
        out += gate[:, None] * shared
    return out, logits


def _outlier_inputs(seed: int, tokens: int = 64) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(tokens, D_MODEL))
    x[:, [3, 11]] *= 40.0  # the planted outlier channels
    return x


def test_smoothing_is_function_preserving_in_float64():
    params, x = _params(0), _outlier_inputs(1)
    with jax.enable_x64(True):
        smoothed, scales = expert_aware_smoothing(
            {k: jnp.asarray(v) for k, v in params.items()}, channel_absmax(jnp.asarray(x)), 0.5
        )
        smoothed = {k: np.asarray(v) for k, v in smoothed.items()}
        scales = np.asarray(scales)
    assert scales.dtype == np.float64 and not np.allclose(scales, 1.0)
    np.testing.assert_array_equal(smoothed["w_down"], params["w_down"])
    expected, expected_logits = _moe_reference(params, x)
    got, logits = _moe_reference(smoothed, x / scales)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got, expected, rtol=1e-11, atol=1e-12)


def test_smoothing_scales_take_the_weight_max_over_every_expert_and_the_router():
    params = _params(2)
    params["w_up"][2, 5, 3] = 9.0  # one expert's outlier weight on channel 5
    params["router"][7, 1] = -6.0  # and the router's on channel 7
    act = np.random.default_rng(3).uniform(0.5, 20.0, size=D_MODEL)
    names = ["router", "w_gate", "w_up", "shared_w_gate", "shared_w_up"]
    w_max = np.max(
        [np.abs(np.moveaxis(params[n], -2, 0)).reshape(D_MODEL, -1).max(1) for n in names], 0
    )
    with jax.enable_x64(True):
        scales = smoothing_scales(jnp.asarray(act), [jnp.asarray(params[n]) for n in names], 0.6)
    np.testing.assert_allclose(np.asarray(scales), act**0.6 / w_max**0.4, rtol=1e-12)
    assert w_max[5] == 9.0 and w_max[7] == 6.0


def test_smoothing_lowers_w4a4_error_with_outlier_channels():
    params = {k: jnp.asarray(v, jnp.float32) for k, v in _params(4).items()}
    x = jnp.asarray(_outlier_inputs(5, tokens=128), jnp.float32)
    smoothed, scales = expert_aware_smoothing(params, channel_absmax(x), 0.5)

    @jax.jit
    def relative_error(p, inputs):  # router logits and every expert's gate projection, W4A4
        x_q = fake_quant_activations(inputs, 4)
        errors = []
        for name in ("router", "w_gate", "shared_w_gate"):
            exact = jnp.einsum("td,...df->...tf", x, params[name])
            quantised = jnp.einsum("td,...df->...tf", x_q, fake_quant(p[name], 4, D_MODEL))
            errors.append(jnp.sum((exact - quantised) ** 2) / jnp.sum(exact**2))
        return sum(errors)

    plain, smooth = relative_error(params, x), relative_error(smoothed, x / scales)
    assert smooth < 0.5 * plain, (smooth, plain)


@pytest.mark.parametrize(
    ("act_shape", "weight_shape", "alpha", "field"),
    [
        ((), (16, 4), 0.5, "act_absmax.shape"),
        ((16,), (16, 4), 1.5, "alpha"),
        ((16,), (3, 8, 4), 0.5, "weights\\[0\\].shape"),
    ],
)
def test_smoothing_scales_reject_bad_inputs(act_shape, weight_shape, alpha, field):
    with pytest.raises(ValueError, match=field):
        smoothing_scales(jnp.ones(act_shape), [jnp.ones(weight_shape)], alpha)


def _router_case(seed: int):
    """Correlated router inputs and their per-token 4-bit quantised version (the A4 of W3A4)."""
    rng = np.random.default_rng(seed)
    d, tokens = 32, 1024
    mixing = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    x = (rng.normal(size=(tokens, d)) @ mixing).astype(np.float32)
    router = (rng.normal(size=(d, 8)) * 0.3).astype(np.float32)
    return jnp.asarray(router), jnp.asarray(x), fake_quant_activations(jnp.asarray(x), 4)


@pytest.mark.parametrize("seed", [0, 1])
def test_router_alignment_raises_topk_agreement_over_plain_rounding(seed):
    router, x, x_q = _router_case(seed)
    target = x @ router
    plain = x_q @ dequantize(quantize(router, 3, 32))
    aligned = x_q @ dequantize(align_router(router, x, 3, 32, x_quantized=x_q))
    assert router_kl(target, aligned) < 0.8 * router_kl(target, plain)
    before, after = topk_agreement(target, plain, 2), topk_agreement(target, aligned, 2)
    assert after > before + 0.02, (before, after)


def test_router_alignment_corrects_a_systematic_shift_of_the_quantised_inputs():
    router, x, _ = _router_case(3)
    # The quantised model's inputs come out with per-channel gains: the least-squares
    # correction undoes them, which no rounding of the float router can.
    gains = jnp.asarray(np.random.default_rng(4).uniform(0.6, 1.4, size=x.shape[1]), x.dtype)
    x_q = x * gains
    target = x @ router
    plain = topk_agreement(target, x_q @ dequantize(quantize(router, 8, 32)), 2)
    aligned = align_router(router, x, 8, 32, x_quantized=x_q)
    assert topk_agreement(target, x_q @ dequantize(aligned), 2) > max(0.97, plain + 0.05)


def test_router_alignment_is_never_worse_than_plain_rounding():
    router, x, _ = _router_case(2)
    for bits in (2, 8):
        aligned = align_router(router, x, bits, 16)
        plain = quantize(router, bits, 16)
        assert aligned.codes.dtype == jnp.int8 and aligned.scales.shape == plain.scales.shape
        kl = [router_kl(x @ router, x @ dequantize(q)) for q in (aligned, plain)]
        assert kl[0] <= kl[1]


def test_router_alignment_rejects_mismatched_inputs():
    router, x, _ = _router_case(0)
    with pytest.raises(ValueError, match="x.shape"):
        align_router(router, x[:, :5], 4, 32)
    with pytest.raises(ValueError, match="x_quantized.shape"):
        align_router(router, x, 4, 32, x_quantized=x[:10])


def _counts(expert_index, chosen, num_experts):
    return np.array([np.sum(np.any(expert_index[chosen] == e, axis=1)) for e in range(num_experts)])


@pytest.mark.parametrize("top_k", [1, 2])
def test_balanced_calibration_meets_every_experts_quota(top_k):
    rng = np.random.default_rng(top_k)
    num_experts, per_expert = 6, 5
    # Skewed routing: expert 0 takes most tokens, expert 5 only a handful, expert 4 none.
    p = np.array([0.5, 0.2, 0.15, 0.12, 0.0, 0.03])
    expert_index = np.stack(
        [rng.choice(num_experts, top_k, replace=False, p=p) for _ in range(200)]
    )
    chosen = balanced_calibration(expert_index, num_experts, per_expert)
    assert np.all(np.diff(chosen) > 0)
    available = _counts(expert_index, np.arange(200), num_experts)
    quota = np.minimum(per_expert, available)
    got = _counts(expert_index, chosen, num_experts)
    assert available[4] == 0 and got[4] == 0
    if top_k == 1:  # each token serves one expert: exactly the quota
        np.testing.assert_array_equal(got, quota)
    else:
        assert np.all(got >= quota) and len(chosen) <= quota.sum()


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ((np.zeros(4, int), 2, 1), "expert_index.shape"),
        ((np.full((4, 1), 3), 2, 1), "expert_index"),
        ((np.zeros((4, 1), int), 2, -1), "per_expert"),
    ],
)
def test_balanced_calibration_rejects_bad_inputs(args, field):
    with pytest.raises(ValueError, match=field):
        balanced_calibration(*args)
