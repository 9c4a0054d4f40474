"""Token-table router: each token's experts read from a learned table row of its token id,
decoupled from the hidden states.

Read-ME's pre-gating router (Cai et al., "Read-ME: Refactorizing LLMs as Router-Decoupled
Mixture of Experts with System Co-Design", 2024): since the choice depends on the token id
alone, every layer's routing is known before the layers run. The table `[vocab_size, experts]`
holds logits; `moejax.training.expert_compression.moefy_model` fits it to the experts that hold
each token's activation mass (`moejax.pruning.read_me.fit_pregating_router`).
"""

import dataclasses

import jax
import jax.numpy as jnp

from moejax.errors import require_config
from moejax.routers.base import (
    ROUTER_INIT_STD,
    Params,
    RouterOptions,
    RouterSpec,
    Routing,
    check_int,
    check_top_k,
    register,
    require,
)
from moejax.routers.losses import load_balance_loss, router_z_loss

# "softmax": the chosen experts weigh the softmax of their table logits (summing to 1), so the
# table learns through the combine weights. "ones": every chosen expert weighs 1, for experts
# that are slices of one dense feed-forward (MoE-fication), whose output is the sum of all of
# them: with every expert chosen the layer is the dense feed-forward again.
GATES = ("softmax", "ones")


@dataclasses.dataclass(frozen=True)
class TokenTableOptions(RouterOptions):
    """Options of the token-table router.

    Attributes:
      vocab_size: rows of the table (the model's vocabulary); the layer reads it.
      gate: how the chosen experts are weighed, one of `GATES`.
    """

    vocab_size: int = 256
    gate: str = "softmax"
    layer_fields = ("vocab_size",)

    def __post_init__(self) -> None:
        require_config(
            isinstance(self.vocab_size, int) and self.vocab_size >= 1,
            "model.router.options.vocab_size",
            self.vocab_size,
            "an int >= 1",
        )
        require_config(self.gate in GATES, "model.router.options.gate", self.gate, ", ".join(GATES))


def init_token_table_params(key: jax.Array, num_experts: int, vocab_size: int) -> Params:
    """`{"table": [vocab_size, num_experts] float32}`, normal with std `ROUTER_INIT_STD`: near
    uniform, the ties broken at random rather than towards the first experts."""
    check_int(vocab_size, "vocab_size")
    check_int(num_experts, "num_experts")
    return {
        "table": jax.random.normal(key, (vocab_size, num_experts), jnp.float32) * ROUTER_INIT_STD
    }


def token_table(
    params: Params, *, top_k: int, token_ids: jax.Array | None = None, gate: str = "softmax"
) -> Routing:
    """The `top_k` experts of highest logit in each token's table row.

    Read-ME's pre-gating router (Cai et al., 2024). Ids outside [0, vocab_size) wrap modulo
    vocab_size (values cannot be checked under jit).

    Args:
      params: `{"table": [vocab_size, num_experts]}` logits, any floating dtype; the math runs
        in float32.
      top_k: experts per token, in [1, num_experts].
      token_ids: [tokens] int, required.
      gate: "softmax" (the softmax of the chosen logits) or "ones" (weight 1 per chosen
        expert); see `GATES`.

    Returns:
      A `Routing` whose `router_probs` are the softmax of the rows, with aux_losses
      "load_balance" and "router_z" of the rows.
    """
    require(gate in GATES, "gate", gate, ", ".join(GATES))
    table = params["table"]
    require(table.ndim == 2, "params['table']", f"shape {table.shape}", "[vocab_size, experts]")
    vocab_size, num_experts = table.shape
    check_top_k(top_k, num_experts)
    require(
        token_ids is not None
        and token_ids.ndim == 1
        and jnp.issubdtype(token_ids.dtype, jnp.integer),
        "token_ids",
        None if token_ids is None else f"{token_ids.dtype}{list(token_ids.shape)}",
        "an int array [tokens] (the 'token_table' router routes by token id)",
    )
    logits = jnp.take(table.astype(jnp.float32), token_ids % vocab_size, axis=0)  # [tokens, e]
    router_probs = jax.nn.softmax(logits, axis=-1)  # [tokens, experts]
    top_logits, expert_index = jax.lax.top_k(logits, top_k)  # [tokens, top_k]
    if gate == "softmax":
        combine_weights = jax.nn.softmax(top_logits, axis=-1)
    else:
        combine_weights = jnp.ones_like(top_logits)
    return Routing(
        expert_index=expert_index.astype(jnp.int32),
        combine_weights=combine_weights,
        router_probs=router_probs,
        aux_losses={
            "load_balance": load_balance_loss(router_probs, expert_index),
            "router_z": router_z_loss(logits),
        },
    )


def _init_layer_params(
    key: jax.Array, d_model: int, num_experts: int, options: TokenTableOptions
) -> Params:
    return init_token_table_params(key, num_experts, options.vocab_size)


SPEC = register(
    RouterSpec(
        "token_table",
        token_table,
        needs=("params", "token_ids"),
        options=TokenTableOptions,
        init_params=_init_layer_params,
        # Beside the embedding table: its rows are token ids.
        param_axes={"table": ("vocab", None)},
    )
)
