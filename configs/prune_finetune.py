"""Fine-tuning a one-shot pruned MoE with its masks fixed (`benchmarks/pruning_lm.py`).

The model and data are `configs/router_comparison.py`'s. Pruning: 50% of the expert weights
(`w_gate`, `w_up`, `w_down` of the MoE layers) by magnitude, each tensor on its own; the
benchmark computes the masks of a trained dense run (then refines them with DSnoT) and writes
them into this run's optimizer state at step 0. schedule "none": the masks never change
during fine-tuning and the pruned weights stay exactly zero.

Optimisation: 100 steps of AdamW from a fresh optimizer state at a third of the pre-training
learning rate (1e-3, 10 warmup steps, cosine to 10%): enough to recover from the cut, not a
second pre-training.
"""

import dataclasses
from pathlib import Path

from moejax.config import Config, LMPruningConfig, load_config_file
from moejax.pruning import MethodConfig, PatternConfig, ScheduleConfig, ScoreConfig
from moejax.training.pruning import EXPERT_MIN_NDIM, EXPERT_WEIGHTS


def get_config() -> Config:
    base = load_config_file(Path(__file__).with_name("router_comparison.py"))
    return dataclasses.replace(
        base,
        train=dataclasses.replace(
            base.train, steps=100, learning_rate=1e-3, warmup_steps=10, eval_every=50
        ),
        pruning=LMPruningConfig(
            method=MethodConfig("masked"),
            score=ScoreConfig("magnitude"),
            pattern=PatternConfig.of("unstructured", scope="layer"),
            target_sparsity=0.5,
            schedule=ScheduleConfig("none"),
            param_regex=EXPERT_WEIGHTS,
            min_ndim=EXPERT_MIN_NDIM,
        ),
    )
