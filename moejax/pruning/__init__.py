"""Masked pruning: registries of patterns, scores, schedules and methods (`base.py`), an optax
wrapper that keeps masks in the optimizer state, and the methods: plain masked pruning, N:M
training (SR-STE), learnable N:M masks (MaskLLM), training-free mask refinement (DSnoT), one-shot
pruning from calibration statistics (magnitude, Wanda, SparseGPT, ARMOR's factorisation;
`one_shot.ONE_SHOT_METHODS`) and the mask rounds of lottery tickets (the experiment is
`moejax.tasks.lottery`).

The registries are filled by the imports below, one file per family or method; adding an entry
is one `register(...)` call and, for a built-in, one import line here.
"""

from moejax.pruning import (  # noqa: F401 - each import registers its entries
    armor,
    dsnot,
    lottery,
    masked,
    maskllm,
    patterns,
    schedules,
    scores,
    srste,
)
from moejax.pruning.base import (
    METHODS,
    PATTERNS,
    SCHEDULES,
    SCORES,
    MethodSpec,
    PatternSpec,
    PruningOptions,
    ScheduleSpec,
    ScoreSpec,
    get_method,
    get_pattern,
    get_schedule,
    get_score,
    register,
)
from moejax.pruning.config import (
    LMPruningConfig,
    MethodConfig,
    PatternConfig,
    PruningConfig,
    ScheduleConfig,
    ScoreConfig,
    make_pruner,
    wrap_optimizer,
)
from moejax.pruning.masks import (
    ParamFilter,
    apply_masks,
    ones_masks,
    path_name,
    prunable_tree,
    sparsity_report,
)
from moejax.pruning.optax_wrapper import (
    Pruner,
    PruneState,
    find_prune_state,
    get_masks,
    prune_optax,
    replace_prune_state,
    rewound_params,
)

__all__ = [
    "METHODS",
    "PATTERNS",
    "SCHEDULES",
    "SCORES",
    "LMPruningConfig",
    "MethodConfig",
    "MethodSpec",
    "ParamFilter",
    "PatternConfig",
    "PatternSpec",
    "PruneState",
    "Pruner",
    "PruningConfig",
    "PruningOptions",
    "ScheduleConfig",
    "ScheduleSpec",
    "ScoreConfig",
    "ScoreSpec",
    "apply_masks",
    "find_prune_state",
    "get_masks",
    "get_method",
    "get_pattern",
    "get_schedule",
    "get_score",
    "make_pruner",
    "ones_masks",
    "path_name",
    "prunable_tree",
    "prune_optax",
    "register",
    "replace_prune_state",
    "rewound_params",
    "sparsity_report",
    "wrap_optimizer",
]
