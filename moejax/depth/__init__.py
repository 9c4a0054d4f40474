"""Conditional depth: ways to spend less than one full block per token.

All are pure functions around a caller's `block_fn`, so the transformer can wrap any block
(attention + MLP, or a MoE feed-forward):

- `mixture_of_depths`: per sequence, only the top-C tokens by a learned scalar router go
  through the block; the rest ride the residual stream unchanged. `mixture_of_depths_causal`
  is the decoding-time variant that selects with a causal predictor instead of top-C.
- `layer_router`: per sequence, a small router picks skip / execute / repeat (Dr.LLM).
- `halting`: per token, skip a MoE update whose norm is small next to the residual stream
  (Equifinality).

Contract for `block_fn`: it receives `[batch, n, d_model]` tokens and returns the block's
residual *update* (what the block adds to its input), same shape. Causal masking inside the
tokens it is given is the block's job; routing decides only which tokens it is given.
Routing math runs in float32 whatever the activation dtype, as in `moejax.routers`.
"""

from moejax.depth.halting import (
    apply_halting,
    halting_mask_from_previous,
    moe_flops_saved_fraction,
    relative_norm,
    relative_norm_halting,
)
from moejax.depth.layer_router import (
    EXECUTE,
    LAYER_DECISIONS,
    REPEAT,
    SKIP,
    greedy_decisions,
    init_layer_router,
    layer_router_logits,
    layer_router_loss,
    routed_block,
)
from moejax.depth.mixture_of_depths import (
    ROUTER_ACTIVATIONS,
    BlockFn,
    Params,
    causal_predictor_logits,
    init_causal_predictor,
    mixture_of_depths,
    mixture_of_depths_causal,
    mod_capacity,
    mod_router_scores,
    predictor_loss_and_accuracy,
    select_tokens_causal,
    top_c_index,
)

__all__ = [
    "EXECUTE",
    "LAYER_DECISIONS",
    "REPEAT",
    "ROUTER_ACTIVATIONS",
    "SKIP",
    "BlockFn",
    "Params",
    "apply_halting",
    "causal_predictor_logits",
    "greedy_decisions",
    "halting_mask_from_previous",
    "init_causal_predictor",
    "init_layer_router",
    "layer_router_logits",
    "layer_router_loss",
    "mixture_of_depths",
    "mixture_of_depths_causal",
    "mod_capacity",
    "mod_router_scores",
    "moe_flops_saved_fraction",
    "predictor_loss_and_accuracy",
    "relative_norm",
    "relative_norm_halting",
    "routed_block",
    "select_tokens_causal",
    "top_c_index",
]
