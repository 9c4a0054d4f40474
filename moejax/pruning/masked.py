"""The methods "none" (pruning off) and "masked": plain masked pruning through `Pruner`.

"masked" trains under the masks of the optimizer state (`prune_optax`): the forward pass sees
the prunable weights under their masks, every update keeps pruned weights at exactly zero, and
the schedule recomputes the masks from the chosen score and pattern. "none" is jaxpruner's
`no_prune`: a run with it trains and checkpoints as without pruning.
"""

from moejax.pruning.base import MethodSpec, register

NONE = register(MethodSpec("none", prunes=False))
MASKED = register(MethodSpec("masked"))
