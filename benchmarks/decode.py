"""KV-cached decoding: prefill and decode tokens/s, and a cached step against recomputation.

    python benchmarks/decode.py [--repeats 5] [--context 512]

Tiny models of each pretrained architecture (random weights from their config.json fields, the
sizes of the tests' checkpoints: d_model 64, 2-3 layers) and the default LM: `moejax.generate`
on 4 prompts of 32 tokens, 32 new tokens, greedy; prefill tokens/s = prompt tokens / prefill
time, decode tokens/s = generated tokens / decode time, both after a compile-and-warm-up call.

Then, on the default LM stretched to `--context + 64` positions, one cached decode step at
`--context` tokens of context against recomputing the whole sequence (`model(tokens)` on
`[1, context + 1]`), the way an uncached sampler must: medians of `--repeats`, in this run.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.config import ModelConfig
from moejax.generation import generate
from moejax.models.transformer import TransformerLM
from moejax.pretrained import config_from_hf

COMMON = {
    "vocab_size": 128,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "num_hidden_layers": 2,
}
ARCHITECTURES = {
    "llama": {"model_type": "llama", "intermediate_size": 96},
    "mixtral": {
        "model_type": "mixtral",
        "intermediate_size": 48,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
    },
    "olmoe": {
        "model_type": "olmoe",
        "intermediate_size": 48,
        "num_experts": 8,
        "num_experts_per_tok": 2,
    },
    "qwen2_moe": {
        "model_type": "qwen2_moe",
        "num_hidden_layers": 3,
        "intermediate_size": 96,
        "moe_intermediate_size": 48,
        "shared_expert_intermediate_size": 80,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "mlp_only_layers": [1],
    },
    "qwen3_moe": {
        "model_type": "qwen3_moe",
        "head_dim": 32,
        "moe_intermediate_size": 48,
        "num_experts": 8,
        "num_experts_per_tok": 2,
    },
    "deepseek_v3": {
        "model_type": "deepseek_v3",
        "num_hidden_layers": 3,
        "num_key_value_heads": 4,
        "intermediate_size": 112,
        "moe_intermediate_size": 48,
        "n_routed_experts": 8,
        "n_shared_experts": 2,
        "num_experts_per_tok": 2,
        "n_group": 4,
        "topk_group": 2,
        "first_k_dense_replace": 1,
        "q_lora_rank": 32,
        "kv_lora_rank": 24,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 12,
    },
}
BATCH, PROMPT, NEW = 4, 32, 32


def throughput(model: TransformerLM, vocab: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of `generate`, after a warm-up call."""
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, vocab, PROMPT)) for _ in range(BATCH)]
    generate(model, prompts, max_new_tokens=NEW)
    out = generate(model, prompts, max_new_tokens=NEW)
    # NEW tokens per row: the first from the prefill, NEW - 1 decode steps.
    return BATCH * PROMPT / out.prefill_seconds, BATCH * (NEW - 1) / out.decode_seconds


def median_seconds(run, repeats: int) -> float:
    jax.block_until_ready(run())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cached_against_recompute(context: int, repeats: int) -> tuple[float, float]:
    """(seconds of a cached step at `context`, seconds of the full forward on context + 1)."""
    config = dataclasses.replace(ModelConfig(), max_seq_len=context + 64)
    model = TransformerLM(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (1, context + 1)), jnp.int32)

    @jax.jit
    def prefill(state, tokens, cache):
        positions = jnp.arange(tokens.shape[1])[None]
        return nnx.merge(graphdef, state).decode(tokens, positions, cache)[1]

    @jax.jit
    def step(state, token, position, cache):
        return nnx.merge(graphdef, state).decode(token, position, cache)[0]

    @jax.jit
    def recompute(state, tokens):
        return nnx.merge(graphdef, state)(tokens, train=False)[0][:, -1]

    cache = prefill(state, tokens[:, :context], model.init_cache(1, config.max_seq_len))
    position = jnp.full((1, 1), context, jnp.int32)
    cached = median_seconds(lambda: step(state, tokens[:, context:], position, cache), repeats)
    full = median_seconds(lambda: recompute(state, tokens), repeats)
    return cached, full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--context", type=int, default=512)
    args = parser.parse_args()
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s)")
    print(
        f"| model | prefill tokens/s | decode tokens/s |  ({BATCH} prompts x {PROMPT}, {NEW} new)"
    )
    print("|---|---|---|")
    for name, fields in ARCHITECTURES.items():
        config, _, _ = config_from_hf({**COMMON, **fields})
        prefill, decode = throughput(TransformerLM(config, rngs=nnx.Rngs(0)), config.vocab_size)
        print(f"| {name} (tiny) | {prefill:,.0f} | {decode:,.0f} |")
    default = TransformerLM(ModelConfig(), rngs=nnx.Rngs(0))
    prefill, decode = throughput(default, 256)
    print(f"| default LM | {prefill:,.0f} | {decode:,.0f} |")
    cached, full = cached_against_recompute(args.context, args.repeats)
    print(
        f"\ndefault LM at {args.context} tokens of context: cached step {1e3 * cached:.2f} ms, "
        f"recomputing the sequence {1e3 * full:.2f} ms: {full / cached:.1f}x"
    )
    print(f"summary: cached decode step {full / cached:.1f}x faster than recomputation")


if __name__ == "__main__":
    main()
