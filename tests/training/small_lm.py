"""The tiny language model the post-training tests (pruning, quantisation, expert compression,
rewiring) run on: two blocks, 32 wide, a byte-free 64-token vocabulary. Each test file sets its
MoE layers with `small_lm(moe=MoEConfig(...))`."""

import dataclasses

from moejax.config import ModelConfig, MoEConfig

SMALL_LM = ModelConfig(
    vocab_size=64,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    d_ff=48,
    max_seq_len=32,
)


def small_lm(moe: MoEConfig) -> ModelConfig:
    """`SMALL_LM` with the MoE layers `moe`."""
    return dataclasses.replace(SMALL_LM, moe=moe)
