"""BlockFFN's ReLU + RMSNorm router: a variable number of experts per token.

`init_relu_router_params` makes the parameters; `relu_router(hidden [tokens, d_model], params,
*, top_k) -> Routing` routes, with the token-level (`l1_activation_loss`) and chunk-level
(`chunk_sparsification_loss`) sparsity objectives of BlockFFN as aux losses.
Routing math runs in float32, whatever the dtype of the hidden states or parameters.
"""

import dataclasses

import jax
import jax.numpy as jnp

from moejax.errors import require_non_negative
from moejax.routers.base import (
    COMMON_LOSS_WEIGHTS,
    ROUTER_INIT_STD,
    Params,
    RouterSpec,
    Routing,
    TopKOptions,
    check_hidden,
    check_int,
    check_top_k,
    register,
    require,
)
from moejax.routers.losses import active_load_balance_loss


@dataclasses.dataclass(frozen=True)
class ReluRouterOptions(TopKOptions):
    """Options of the ReLU + RMSNorm router (BlockFFN).

    Attributes:
      renormalize: True (the default here, unlike `relu_router`'s) weighs the active experts
        by their shares of the token's activation; False by the raw activations.
      sparsity_weight: weight of the token-level activation-sparsity (L1) loss.
      chunk_sparsity_weight: weight of the chunk-level sparsity loss over 8 consecutive tokens.
    """

    sparsity_weight: float = 0.0
    chunk_sparsity_weight: float = 0.0
    layer_fields = ("sparsity_weight", "chunk_sparsity_weight")

    def __post_init__(self) -> None:
        require_non_negative("model.router.options", self, self.layer_fields)


def init_relu_router_params(key: jax.Array, d_model: int, num_experts: int) -> Params:
    """Parameters of `relu_router`.

    Returns:
      "w_router": [d_model, num_experts] float32, normal with std 0.02;
      "norm_scale": [num_experts] float32, ones (the RMSNorm gain).
    """
    check_int(d_model, "d_model")
    check_int(num_experts, "num_experts")
    return {
        "w_router": jax.random.normal(key, (d_model, num_experts), jnp.float32) * ROUTER_INIT_STD,
        "norm_scale": jnp.ones((num_experts,), jnp.float32),
    }


def relu_router_activations(
    hidden: jax.Array, params: Params, eps: float = 1e-6
) -> tuple[jax.Array, jax.Array]:
    """BlockFFN router activations `RMSNorm(ReLU(hidden @ w_router))`.

    Song et al., "BlockFFN: Towards End-Side Acceleration-Friendly Mixture-of-Experts with
    Chunk-Level Activation Sparsity" (2025). The norm comes after the ReLU (as in the reference
    code, `norm_after_router="rms"`), so an expert the ReLU switches off stays exactly 0, and a
    token whose activations are all 0 stays all 0 (0 * rsqrt(eps) = 0, with a finite gradient).

    Args:
      hidden: [tokens, d_model].
      params: from `init_relu_router_params`.
      eps: RMSNorm epsilon.

    Returns:
      (relu [tokens, experts] >= 0, the raw ReLU outputs; activations [tokens, experts], the
      RMSNorm of relu, which the experts are weighted by).
    """
    check_hidden(hidden, params["w_router"], "w_router")
    scores = hidden.astype(jnp.float32) @ params["w_router"].astype(jnp.float32)  # [t, experts]
    relu = jax.nn.relu(scores)
    inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(relu), axis=-1, keepdims=True) + eps)  # [t, 1]
    return relu, relu * inv_rms * params["norm_scale"].astype(jnp.float32)


def activation_distribution(relu: jax.Array) -> jax.Array:
    """`relu / sum_e relu` per token: [tokens, experts] -> [tokens, experts], rows sum to 1 or 0.

    The per-token RMS factor cancels in this ratio, so it equals the reference code's
    `router_score_scaled` whatever the norm. A token with no active expert gets a zero row.
    """
    total = jnp.sum(relu, axis=-1, keepdims=True)  # [tokens, 1]
    return relu / jnp.where(total > 0, total, 1.0)


def l1_activation_loss(activations: jax.Array) -> jax.Array:
    """Token-level sparsity regulariser: mean over tokens of `sum_e |activation_e|`.

    BlockFFN regularises the L1 norm of the router activations (its code sums over all tokens
    and multiplies by 1e-8; a mean over tokens keeps the weight independent of the batch). After
    RMSNorm a token's activations have RMS |gain|, so this is an L1/L2 ratio: it falls as the
    activations get fewer and larger, and also when the gain shrinks.

    Args:
      activations: [tokens, experts].

    Returns:
      scalar float32.
    """
    return jnp.mean(jnp.sum(jnp.abs(activations.astype(jnp.float32)), axis=-1))


def chunk_sparsification_loss(
    probs: jax.Array, *, seq_len: int | None = None, chunk_size: int = 8, eps: float = 1e-5
) -> jax.Array:
    """BlockFFN's chunk sparsification loss: the mean probability an expert is used by a chunk.

    Song et al., "BlockFFN: Towards End-Side Acceleration-Friendly Mixture-of-Experts with
    Chunk-Level Activation Sparsity" (2025). Reading each token's activation share `p_{i,e}` as the
    probability that token i uses expert e, independently, expert e is used somewhere in a chunk
    of L tokens with probability `1 - prod_i (1 - p_{i,e})`; the loss is that probability averaged
    over chunks and experts, computed as `1 - mean exp(sum_i log(1 - p_{i,e} + eps))` as the
    reference code does. It is a differentiable stand-in for 1 - chunk-level sparsity.

    Chunks never cross a sequence boundary; a trailing partial chunk of a sequence is left out,
    as `moejax.metrics.chunk_union_sizes` does.

    Args:
      probs: [tokens, experts], each row in [0, 1] (`activation_distribution`); tokens are
        sequences of `seq_len` laid end to end.
      seq_len: tokens per sequence; None means all tokens are one sequence.
      chunk_size: tokens per chunk (L; BlockFFN reports 8-token CLS), 1 <= chunk_size <= seq_len.
      eps: keeps the log finite where p = 1.

    Returns:
      scalar float32.
    """
    tokens, num_experts = probs.shape
    seq_len = tokens if seq_len is None else seq_len
    check_int(seq_len, "seq_len")
    require(tokens % seq_len == 0, "seq_len", seq_len, f"a divisor of tokens={tokens}")
    require(
        isinstance(chunk_size, int) and 1 <= chunk_size <= seq_len,
        "chunk_size",
        chunk_size,
        f"an int with 1 <= chunk_size <= seq_len={seq_len}",
    )
    num_chunks = seq_len // chunk_size
    sequences = probs.astype(jnp.float32).reshape(tokens // seq_len, seq_len, num_experts)
    chunks = sequences[:, : num_chunks * chunk_size].reshape(
        -1, num_chunks, chunk_size, num_experts
    )  # [batch, chunks, chunk_size, experts]
    log_unused = jnp.sum(jnp.log(1.0 - chunks + eps), axis=2)  # [batch, chunks, experts]
    return 1.0 - jnp.mean(jnp.exp(log_unused))


def relu_router(
    hidden: jax.Array,
    params: Params,
    *,
    top_k: int | None = None,
    renormalize: bool = False,
    seq_len: int | None = None,
    chunk_size: int = 8,
) -> Routing:
    """BlockFFN's ReLU + RMSNorm router: a variable number of experts per token.

    Song et al., "BlockFFN: Towards End-Side Acceleration-Friendly Mixture-of-Experts with
    Chunk-Level Activation Sparsity" (2025). Expert e is active for a token when its ReLU output
    is positive. The `top_k` slots hold the experts with the largest ReLU outputs; a slot whose
    expert is inactive has combine weight exactly 0, so the number of experts used varies per
    token (from 0 to top_k). With top_k = num_experts no active expert is ever dropped.

    Args:
      hidden: [tokens, d_model], any floating dtype.
      params: from `init_relu_router_params`.
      top_k: slots per token, the most experts a token can use, in [1, num_experts]; None means
        num_experts.
      renormalize: combine weights are the active experts' shares of the token's activation (sum
        to 1) instead of the RMSNorm outputs the paper weights experts by.
      seq_len: tokens per sequence, for the chunk objective; None means one sequence.
      chunk_size: tokens per chunk of the chunk objective.

    Returns:
      A `Routing` whose router_probs are the activation shares (rows sum to 1, or 0 for a token
      with no active expert) and whose aux_losses are "load_balance" (BlockFFN's: over active
      assignments, with the shares as importance), "router_z" (0.0: there are no logits),
      "relu_sparsity" (`l1_activation_loss`) and "chunk_sparsity_loss"
      (`chunk_sparsification_loss`).
    """
    num_experts = params["w_router"].shape[1]
    top_k = num_experts if top_k is None else top_k
    check_top_k(top_k, num_experts)
    relu, activations = relu_router_activations(hidden, params)  # [tokens, experts] each
    probs = activation_distribution(relu)  # [tokens, experts]
    top_relu, expert_index = jax.lax.top_k(relu, top_k)  # [tokens, top_k]
    active = top_relu > 0  # [tokens, top_k]
    weights = probs if renormalize else activations
    chosen = jnp.take_along_axis(weights, expert_index, axis=-1)  # [tokens, top_k]
    # where, not multiply: a negative gain times 0 would give -0.0, and an unused slot must hold
    # exactly 0.
    combine_weights = jnp.where(active, chosen, 0.0)
    expert_index = expert_index.astype(jnp.int32)
    return Routing(
        expert_index=expert_index,
        combine_weights=combine_weights,
        router_probs=probs,
        aux_losses={
            "load_balance": active_load_balance_loss(probs, combine_weights, expert_index),
            "router_z": jnp.zeros((), jnp.float32),
            "relu_sparsity": l1_activation_loss(activations),
            "chunk_sparsity_loss": chunk_sparsification_loss(
                probs, seq_len=seq_len, chunk_size=chunk_size
            ),
        },
    )


def _init_layer_params(key: jax.Array, d_model: int, num_experts: int, options) -> Params:
    return init_relu_router_params(key, d_model, num_experts)


SPEC = register(
    RouterSpec(
        "relu_rmsnorm",
        relu_router,
        needs=("hidden", "params", "seq_len", "chunk_size"),
        options=ReluRouterOptions,
        init_params=_init_layer_params,
        param_axes={"w_router": ("embed", None), "norm_scale": (None,)},
        loss_weights={
            **COMMON_LOSS_WEIGHTS,
            "relu_sparsity": "sparsity_weight",
            "chunk_sparsity_loss": "chunk_sparsity_weight",
        },
    )
)
