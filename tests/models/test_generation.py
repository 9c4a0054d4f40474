"""KV-cached generation (`moejax.generation`, `TransformerLM.decode`): equal to recomputing
the sequence, prompts of different lengths, stop tokens, nucleus sampling, on a mesh."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import DispatchConfig, ModelConfig, MoEConfig
from moejax.generation import generate, sample_next
from moejax.latent_attention import LatentAttentionConfig
from moejax.models.transformer import TransformerLM
from moejax.parallel.sharding import logical_axes, make_mesh, tree_shardings
from moejax.sparse_attention import AttentionConfig

SMALL = ModelConfig(
    vocab_size=64,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    d_ff=48,
    max_seq_len=48,
    tie_embeddings=False,
    qk_norm="per_head",
    moe=MoEConfig(every=2, num_experts=4, top_k=2, expert_d_ff=16, num_shared_experts=1),
)
LATENT = dataclasses.replace(
    SMALL,
    latent_attention=LatentAttentionConfig(
        kv_lora_rank=12, q_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6
    ),
)


@pytest.mark.parametrize("config", [SMALL, LATENT], ids=["grouped_query", "latent"])
def test_cached_decoding_equals_recomputing_the_sequence(config):
    """Prompts of 3, 7 and 5 tokens, 6 greedy steps: every step's logits are those of the full
    forward pass over the prompt and the tokens generated before it."""
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, config.vocab_size, n)) for n in (3, 7, 5)]
    out = generate(model, prompts, max_new_tokens=6)
    forward = jax.jit(lambda tokens: model(tokens, train=False)[0])
    for row, prompt in enumerate(prompts):
        sequence = prompt + out.tokens[row]
        logits = np.asarray(forward(jnp.asarray([sequence])))[0]
        for step in range(6):
            expected = logits[len(prompt) - 1 + step]
            np.testing.assert_allclose(out.logits[row, step], expected, atol=2e-5, rtol=2e-5)
            assert out.tokens[row][step] == int(np.argmax(expected))


def test_a_sequence_ends_at_its_stop_token_and_the_others_go_on():
    model = TransformerLM(SMALL, rngs=nnx.Rngs(1))
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    free = generate(model, prompts, max_new_tokens=5)
    stop = free.tokens[0][1]
    stopped = generate(model, prompts, max_new_tokens=5, stop_tokens=[stop])
    assert stopped.tokens[0] == free.tokens[0][: free.tokens[0].index(stop) + 1]
    if stop not in free.tokens[1]:
        assert stopped.tokens[1] == free.tokens[1]


def test_nucleus_sampling_draws_only_from_the_top_p_mass():
    """Probabilities 0.5, 0.3, 0.15, 0.05: top_p=0.7 keeps the first two (0.5 < 0.7 <= 0.8),
    in proportion 5:3."""
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(
        jax.vmap(lambda k: sample_next(logits, k, temperature=1.0, top_p=0.7)[0])(keys)
    )
    assert set(np.unique(draws)) == {0, 1}
    assert abs(np.mean(draws == 0) - 0.5 / 0.8) < 0.03
    greedy = sample_next(logits, keys[0], temperature=0.0, top_p=1.0)
    assert int(greedy[0]) == 0


def test_generation_on_a_mesh_matches_one_device():
    """Experts split over 2 devices (expert-parallel dispatch), heads over 2, batch over 2:
    the same tokens and logits as the dropless model on one device."""
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9], [10]]
    alone = generate(TransformerLM(SMALL, rngs=nnx.Rngs(2)), prompts, max_new_tokens=4)
    moe = dataclasses.replace(SMALL.moe, dispatch=DispatchConfig.of("expert_parallel"))
    model = TransformerLM(dataclasses.replace(SMALL, moe=moe), rngs=nnx.Rngs(2))
    mesh = make_mesh({"data": 2, "fsdp": 1, "expert": 2, "tensor": 2}, jax.devices()[:8])
    graphdef, params = nnx.split(model, nnx.Param)
    shardings = tree_shardings(mesh, logical_axes(params))
    sharded = nnx.merge(graphdef, jax.device_put(nnx.to_pure_dict(params), shardings))
    assert len(sharded.blocks[1].ffn.w_gate[...].sharding.device_set) == 8
    with jax.set_mesh(mesh):
        on_mesh = generate(sharded, prompts, max_new_tokens=4)
    assert on_mesh.tokens == alone.tokens
    np.testing.assert_allclose(on_mesh.logits, alone.logits, atol=1e-5, rtol=1e-5)


def test_kinds_that_cannot_decode_say_why():
    config = dataclasses.replace(SMALL, max_seq_len=64)
    model = TransformerLM(
        config, attention=AttentionConfig.of("moba", block_size=16), rngs=nnx.Rngs(0)
    )
    with pytest.raises(ValueError, match="block 0 cannot decode.*block-sparse attention"):
        generate(model, [[1, 2]], max_new_tokens=2)


def test_bad_arguments_name_the_argument():
    model = TransformerLM(SMALL, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1] * 40], max_new_tokens=20)
    with pytest.raises(ValueError, match="prompts"):
        generate(model, [[]], max_new_tokens=2)
