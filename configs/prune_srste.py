"""2:4 SR-STE on the expert weights of every MoE layer, otherwise `configs/router_comparison.py`.

*Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch*: the dense expert
weights (`w_gate`, `w_up`, `w_down` of the MoE layers; attention, routers and embedding stay
dense) train; every forward pass uses their 2:4 mask, recomputed from |W| each step, in groups
of 4 along each matrix's input axis (axis 1 of `[experts, d_in, d_out]`: the reduction axis,
as sparse tensor cores need it); gradients go straight through plus the refine term
2e-4 * (1 - M) * W. Evaluation and checkpoints use the 2:4 weights (the masks live in the
optimizer state). `benchmarks/pruning_lm.py` compares it with the dense-weight run.
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
        pruning=LMPruningConfig(
            method=MethodConfig.of("srste", decay=2e-4),
            score=ScoreConfig("magnitude"),
            pattern=PatternConfig.of("nm", n=2, m=4, axis=1),
            schedule=ScheduleConfig("none"),
            param_regex=EXPERT_WEIGHTS,
            min_ndim=EXPERT_MIN_NDIM,
        ),
    )
