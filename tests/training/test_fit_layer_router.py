"""Fitting Dr.LLM layer routers on a frozen LM (`moejax.training.fit_layer_router`)."""

import chex
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings

from moejax import depth
from moejax.config import DepthConfig, ModelConfig, MoEConfig
from moejax.models.moe_layer import RouterContext
from moejax.models.transformer import TransformerLM
from moejax.training import fit_layer_router as fit

BATCH, LENGTH, VOCAB = 16, 8, 32


def tiny_model(layer_router_dim: int = 8, seed: int = 0) -> TransformerLM:
    # Layer 0 is dense and layer 1 a MoE layer, so both block kinds are routed.
    config = ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        d_ff=64,
        moe=MoEConfig(every=2, num_experts=4, top_k=2, expert_d_ff=32),
        depth=DepthConfig(layer_router_dim=layer_router_dim),
    )
    return TransformerLM(config, rngs=nnx.Rngs(seed))


def tokens_and_targets(seed: int = 1) -> tuple[jax.Array, jax.Array]:
    row = jax.random.randint(jax.random.key(seed), (BATCH, LENGTH + 1), 0, VOCAB)
    return row[:, :-1], row[:, 1:]


# Compiled once per model structure (nnx.jit caches on the graph), so tests share compilations.
option_losses = nnx.jit(fit.option_losses)
router_inputs = nnx.jit(fit.router_inputs)


def decided_losses(model, tokens, targets, decisions):
    logits, _ = model(tokens, train=False, layer_decisions=decisions)
    return fit.sequence_losses(logits, targets)


def test_option_losses_equal_explicit_forward_passes_with_those_decisions() -> None:
    model = tiny_model()
    tokens, targets = tokens_and_targets()
    losses = option_losses(model, tokens, targets)
    chex.assert_shape(losses, (2, BATCH, 3))
    reference = nnx.jit(decided_losses)
    for layer in range(2):
        for option in range(3):
            decisions = jnp.full((2, BATCH), depth.EXECUTE, jnp.int32).at[layer].set(option)
            np.testing.assert_allclose(
                losses[layer, :, option],
                reference(model, tokens, targets, decisions),
                rtol=2e-5,
                err_msg=f"layer {layer}, option {depth.LAYER_DECISIONS[option]}",
            )
    # A fresh model's options differ, or the check above could not tell them apart.
    assert float(jnp.min(jnp.abs(losses[:, :, 0] - losses[:, :, 1]))) > 0


def execute_streams(model: TransformerLM, tokens: jax.Array) -> list[jax.Array]:
    """The residual streams entering each block when every block executes, via `Block`."""
    execute = jnp.full((tokens.shape[0],), depth.EXECUTE, jnp.int32)
    streams = [model.embed(tokens)]
    for block in model.blocks:
        x, _, _ = block(
            streams[-1], RouterContext(token_ids=tokens), train=False, layer_decision=execute
        )
        streams.append(x)
    return streams[:-1]


def test_router_inputs_give_the_router_logits_of_the_whole_stream() -> None:
    model = tiny_model()
    tokens, _ = tokens_and_targets(seed=2)
    inputs = router_inputs(model, tokens)
    chex.assert_shape(inputs, (2, BATCH, 1, 32))
    streams = nnx.jit(execute_streams)(model, tokens)
    stacked = fit.get_router_params(model)
    stacked["w_out"] = jax.random.normal(jax.random.key(3), stacked["w_out"].shape)
    for layer, x in enumerate(streams):
        params = {name: value[layer] for name, value in stacked.items()}
        np.testing.assert_allclose(
            depth.layer_router_logits(inputs[layer], params),
            depth.layer_router_logits(x, params),
            rtol=1e-5,
            atol=1e-6,
        )


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    penalty=st.sampled_from([0.0, 0.01, 0.1, 1.0]),
)
def test_layer_labels_follow_greedy_decisions_layer_by_layer(seed: int, penalty: float) -> None:
    losses = jax.random.uniform(jax.random.key(seed), (3, 5, 3)) * 0.5
    labels = fit.layer_labels(losses, compute_penalty=penalty)
    chex.assert_shape(labels, (3, 5))
    for layer in range(3):
        np.testing.assert_array_equal(
            labels[layer], depth.greedy_decisions(losses[layer], compute_penalty=penalty)
        )


def test_block_applications_count_zero_one_two_per_decision() -> None:
    decisions = jnp.asarray([[depth.SKIP, depth.EXECUTE], [depth.REPEAT, depth.REPEAT]])
    np.testing.assert_array_equal(fit.block_applications(decisions), [2, 3])


def test_balanced_class_weights_are_capped_majority_over_class_counts() -> None:
    labels = jnp.asarray([[1, 1, 1, 0, 1, 1], [2, 2, 2, 2, 0, 0]])
    weights = fit.class_weights(labels, fit.FitOptions())
    np.testing.assert_allclose(weights, [[5.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    capped = fit.class_weights(labels, fit.FitOptions(max_class_weight=3.0))
    np.testing.assert_allclose(capped, [[3.0, 1.0, 0.0], [2.0, 0.0, 1.0]])
    assert fit.class_weights(labels, fit.FitOptions(class_weighting="none")) is None


def test_fitting_loss_is_the_mean_of_the_layer_router_losses() -> None:
    model = tiny_model()
    stacked = fit.get_router_params(model)
    stacked["w_out"] = jax.random.normal(jax.random.key(4), stacked["w_out"].shape)
    inputs = jax.random.normal(jax.random.key(5), (2, 6, 1, 32))
    labels = jnp.asarray([[0, 1, 2, 1, 1, 0], [2, 2, 1, 1, 1, 1]])
    weights = jnp.asarray([[2.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    expected = np.mean(
        [
            depth.layer_router_loss(
                depth.layer_router_logits(inputs[layer], {k: v[layer] for k, v in stacked.items()}),
                labels[layer],
                class_weights=weights[layer],
                focal_gamma=2.0,
            )
            for layer in range(2)
        ]
    )
    np.testing.assert_allclose(
        jax.jit(fit.fitting_loss, static_argnums=4)(stacked, inputs, labels, weights, 2.0),
        expected,
        rtol=1e-6,
    )


def test_fitting_changes_only_the_routers_and_raises_their_accuracy() -> None:
    model = tiny_model()
    tokens, targets = tokens_and_targets(seed=6)
    losses = option_losses(model, tokens, targets)
    # The median gain of executing over skipping layer 0 as the penalty splits that layer's
    # labels about half and half, so a constant router cannot score well there.
    penalty = float(jnp.median(losses[0, :, 0] - losses[0, :, 1]))
    labels = fit.layer_labels(losses, compute_penalty=max(penalty, 0.0))
    assert len(np.unique(np.asarray(labels[0]))) > 1
    inputs = router_inputs(model, tokens)

    frozen_before = jax.tree.map(np.array, nnx.state(model, nnx.Not(fit.ROUTER_PARAMS)))
    routers_before = jax.tree.map(np.array, fit.get_router_params(model))
    result = fit.fit_layer_routers(
        model, inputs, labels, fit.FitOptions(steps=200, learning_rate=1e-2)
    )

    frozen_after = jax.tree.map(np.array, nnx.state(model, nnx.Not(fit.ROUTER_PARAMS)))
    jax.tree.map(np.testing.assert_array_equal, frozen_after, frozen_before)
    routers_after = fit.get_router_params(model)
    assert not np.array_equal(routers_after["w_out"], routers_before["w_out"])
    np.testing.assert_allclose(
        fit.router_accuracy(routers_after, inputs, labels), result.accuracy_after
    )
    chex.assert_shape(result.losses, (200,))
    assert float(result.losses[-1]) < float(result.losses[0])
    assert float(jnp.mean(result.accuracy_after)) > float(jnp.mean(result.accuracy_before))
    assert float(result.accuracy_after[0]) >= 0.9


def test_fit_rejects_bad_options_and_shapes() -> None:
    with pytest.raises(ValueError, match="steps"):
        fit.FitOptions(steps=0)
    with pytest.raises(ValueError, match="class_weighting"):
        fit.FitOptions(class_weighting="inverse")
    with pytest.raises(ValueError, match="focal_gamma"):
        fit.FitOptions(focal_gamma=-0.5)
    with pytest.raises(ValueError, match="layer_router_dim"):
        fit.get_router_params(tiny_model(layer_router_dim=0))
    model = tiny_model()
    stacked = fit.get_router_params(model)
    with pytest.raises(ValueError, match="labels"):
        fit.fit_router_params(
            stacked, jnp.zeros((2, 4, 1, 32)), jnp.zeros((2, 3), jnp.int32), fit.FitOptions()
        )
    with pytest.raises(ValueError, match="losses"):
        fit.layer_labels(jnp.zeros((4, 3)), compute_penalty=0.0)
