"""Masked pruning: patterns, scores, schedules, an optax wrapper that keeps masks in the
optimizer state, N:M training (SR-STE), learnable N:M masks (MaskLLM), training-free mask
refinement (DSnoT) and the mask rounds of lottery tickets (the experiment is
`moejax.tasks.lottery`)."""

from moejax.pruning.config import PruningConfig, make_pruner, wrap_optimizer
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
    "ParamFilter",
    "PruneState",
    "Pruner",
    "PruningConfig",
    "apply_masks",
    "find_prune_state",
    "get_masks",
    "make_pruner",
    "ones_masks",
    "path_name",
    "prunable_tree",
    "prune_optax",
    "replace_prune_state",
    "rewound_params",
    "sparsity_report",
    "wrap_optimizer",
]
