"""What the post-training compression drivers read off a trained `TransformerLM`: each block's
feed-forward input on calibration tokens, with the routing its MoE layer gives them.

Shared by one-shot pruning, quantisation and expert compression (`calibrated_pruning`,
`calibrated_quantization`, `expert_compression`), so all three calibrate on the same tensors:
the output of the block's `ffn_norm`, in evaluation mode, and the layer's own `MoELayer.route`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.models.moe_layer import MoELayer, RouterContext


def _ffn_inputs(model: Any, tokens: jax.Array) -> dict[int, tuple[jax.Array, jax.Array | None]]:
    forward = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)
    _, outputs = forward(tokens, train=False)
    records = {}
    for layer, block in enumerate(model.blocks):
        x = outputs["blocks"][layer]["ffn_norm"]["__call__"].get_value()[0]
        index = None
        if isinstance(block.ffn, MoELayer):
            index = block.ffn.route(x, RouterContext(token_ids=tokens), train=False).expert_index
        records[layer] = (x.reshape(-1, x.shape[-1]).astype(jnp.float32), index)
    return records


ffn_inputs = nnx.jit(_ffn_inputs)
ffn_inputs.__doc__ = """`ffn_inputs(model, tokens [batch, length])`: for each block, (its
feed-forward input `[tokens, d_model]` float32, the MoE routing's `expert_index [tokens,
top_k]` or None for a dense MLP), in evaluation mode."""


def swiglu_hidden(x: jax.Array, w_gate: jax.Array, w_up: jax.Array) -> jax.Array:
    """SwiGLU's hidden activations `[tokens, d_ff]` (the down projection's input) for `x
    [tokens, d_model]`, `w_gate`, `w_up [d_model, d_ff]`."""
    return jax.nn.silu(x @ w_gate) * (x @ w_up)
