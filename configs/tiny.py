"""A seconds-long smoke run: two small layers, a handful of steps. Used by tests and CI."""

import dataclasses

from moejax.config import Config, DataConfig, ModelConfig, MoEConfig, TrainConfig


def get_config() -> Config:
    return dataclasses.replace(
        Config(),
        model=ModelConfig(
            d_model=32,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            d_ff=64,
            max_seq_len=64,
            moe=MoEConfig(num_experts=4, top_k=2, expert_d_ff=32),
        ),
        data=DataConfig(seq_len=32, global_batch_size=8, eval_batch_size=8, eval_batches=2),
        train=TrainConfig(
            steps=20,
            warmup_steps=5,
            log_every=5,
            eval_every=10,
            checkpoint_every=10,
            keep_checkpoints=3,
        ),
    )
