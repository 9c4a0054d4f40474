"""Base config of `benchmarks/router_comparison.py`: the default model, trained for 300 steps.

Model: the default 4-layer byte-level transformer (d_model 128, 4 heads, 2 KV heads), every
feed-forward a MoE layer of 4 experts (expert_d_ff 256), top-2, dropless dispatch, load-balance
weight 0.01, router z-loss weight 0.001. The benchmark changes only the router fields per
variant (see ROUTER_VARIANTS there).

Data: Shakespeare, sequences of 128 bytes, 32 sequences per step (4,096 tokens), so 300 steps
see about 1.2M bytes, a quarter of the 5 MB training text.

Optimisation: AdamW, learning rate 3e-3 with 30 warmup steps and cosine decay to 10%, weight
decay 0.1, gradient clipping at 1.0. Short CPU runs like this one measure early learning speed,
not converged quality.

Evaluation: every 50 steps on the first 8 validation batches (the curves in the report); the
benchmark evaluates the final checkpoint on the whole validation split (269 KB) for its table.
Checkpoints: only the final step is saved (the benchmark needs it for the full evaluation).
"""

import dataclasses

from moejax.config import Config, DataConfig, TrainConfig


def get_config() -> Config:
    return dataclasses.replace(
        Config(),
        data=DataConfig(seq_len=128, global_batch_size=32, eval_batch_size=32, eval_batches=8),
        train=TrainConfig(
            steps=300,
            warmup_steps=30,
            log_every=25,
            eval_every=50,
            checkpoint_every=100_000,
            keep_checkpoints=1,
        ),
    )
