"""Routers that own parameters: pure functions of (hidden states, router params), not of logits.

Three families, each an `init_<name>_params(key, d_model, num_experts, **options) -> params` and a
`<name>(hidden [tokens, d_model], params, *, top_k, **options) -> Routing`:

- `cosine_router` (`moejax.routers.cosine`): cosine similarity to learned expert centroids in a
  low-dimensional space, with a learned temperature (X-MoE; the cosine family of "Equifinality
  in Mixture of Experts").
- `relu_router` (`moejax.routers.relu_rmsnorm`): ReLU then RMSNorm, a differentiable router
  whose number of active experts varies per token, with the token- and chunk-level sparsity
  objectives of BlockFFN.
- `recurrent_router` (`moejax.routers.recurrent`): a GRU state carried from layer to layer
  (RMoE); it also takes and returns the recurrent state, so its signature has one more argument
  and one more result.

This module only re-exports their functions; each router's `RouterSpec` (in its own file) gives
its parameter init and the logical axis names of every parameter (`spec.param_axes`). The expert
dimension of router parameters stays unsharded (None), like `MoELayer.router`: every shard needs
all logits for top-k. All routing math runs in float32, whatever the dtype of the hidden states or
parameters.
"""

from moejax.routers.base import Params
from moejax.routers.cosine import (
    COSINE_INIT_TEMPERATURE,
    COSINE_MAX_TEMPERATURE,
    COSINE_MIN_TEMPERATURE,
    cosine_logits,
    cosine_router,
    init_cosine_router_params,
)
from moejax.routers.recurrent import (
    GRU_PARAM_NAMES,
    gru_cell,
    init_gru_params,
    init_recurrent_router_params,
    recurrent_router,
)
from moejax.routers.relu_rmsnorm import (
    activation_distribution,
    chunk_sparsification_loss,
    init_relu_router_params,
    l1_activation_loss,
    relu_router,
    relu_router_activations,
)

__all__ = [
    "COSINE_INIT_TEMPERATURE",
    "COSINE_MAX_TEMPERATURE",
    "COSINE_MIN_TEMPERATURE",
    "GRU_PARAM_NAMES",
    "Params",
    "activation_distribution",
    "chunk_sparsification_loss",
    "cosine_logits",
    "cosine_router",
    "gru_cell",
    "init_cosine_router_params",
    "init_gru_params",
    "init_recurrent_router_params",
    "init_relu_router_params",
    "l1_activation_loss",
    "recurrent_router",
    "relu_router",
    "relu_router_activations",
]
