"""DeepSeek-V3's router: sigmoid affinities, a bias that steers the choice, group-limited top-k.

DeepSeek-AI, "DeepSeek-V3 Technical Report" (2024), section 2.1.2. Each expert's affinity is
`sigmoid(logit)`. The auxiliary-loss-free bias (Wang et al. 2024, `bias_balanced`) is added to
the affinities to choose experts, never to weigh them. Experts sit in `num_groups` groups (one
per device group in the paper, so that a token's experts span few nodes): each group scores
the sum of its two best biased affinities, the `top_groups` best groups stay eligible, and the
top-k experts are chosen among them. The chosen experts' unbiased affinities, renormalised to
sum to 1 when `renormalize`, times `scaling`, weigh their outputs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moejax.routers.base import (
    RouterOptions,
    RouterSpec,
    Routing,
    check_router_inputs,
    register,
    require,
)
from moejax.routers.bias_balanced import EXPERT_BIAS_STATE
from moejax.routers.losses import active_load_balance_loss, router_z_loss


@dataclasses.dataclass(frozen=True)
class GroupLimitedOptions(RouterOptions):
    """Options of `group_limited_sigmoid`.

    Attributes:
      renormalize: rescale the chosen affinities to sum to 1 (`norm_topk_prob`).
      num_groups: groups the experts are split into (`n_group`); 1: no group limit.
      top_groups: groups each token may choose from (`topk_group`).
      scaling: factor on the combine weights (`routed_scaling_factor`).
    """

    renormalize: bool = True
    num_groups: int = 1
    top_groups: int = 1
    scaling: float = 1.0

    def __post_init__(self) -> None:
        require(self.num_groups >= 1, "model.router.options.num_groups", self.num_groups, ">= 1")
        require(
            1 <= self.top_groups <= self.num_groups,
            "model.router.options.top_groups",
            self.top_groups,
            f"in [1, num_groups={self.num_groups}]",
        )
        require(self.scaling > 0, "model.router.options.scaling", self.scaling, "> 0")


def group_limited_sigmoid(
    router_logits: jax.Array,
    *,
    top_k: int,
    renormalize: bool = True,
    num_groups: int = 1,
    top_groups: int = 1,
    scaling: float = 1.0,
    expert_bias: jax.Array | None = None,
) -> Routing:
    """Sigmoid affinities, top-k among the best groups by biased affinity (see the module
    docstring).

    Args:
      router_logits: [tokens, experts]; experts divisible by `num_groups`, at least 2 per group.
      top_k: experts per token, at most `top_groups * experts // num_groups`.
      expert_bias: [experts] float32, added for the choice only (no gradient); None: zeros.

    Returns:
      A `Routing`; `router_probs` are the affinities normalised over experts per token.
    """
    num_experts = check_router_inputs(router_logits, top_k)
    group_size = num_experts // num_groups
    require(
        num_experts % num_groups == 0 and group_size >= 2,
        "group_limited_sigmoid num_groups",
        num_groups,
        f"a divisor of the {num_experts} experts leaving >= 2 experts per group",
    )
    require(
        top_k <= top_groups * group_size,
        "group_limited_sigmoid top_k",
        top_k,
        f"<= top_groups * experts per group = {top_groups * group_size}",
    )
    logits = router_logits.astype(jnp.float32)
    scores = jax.nn.sigmoid(logits)  # [tokens, experts]
    bias = jnp.zeros(num_experts, jnp.float32) if expert_bias is None else expert_bias
    require(bias.shape == (num_experts,), "expert_bias", bias.shape, f"shape ({num_experts},)")
    biased = jax.lax.stop_gradient(scores + bias)
    grouped = biased.reshape(-1, num_groups, group_size)
    group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [tokens, groups]
    _, best_groups = jax.lax.top_k(group_scores, top_groups)
    eligible = jnp.any(best_groups[:, :, None] == jnp.arange(num_groups), axis=1)
    eligible = jnp.repeat(eligible, group_size, axis=1)  # [tokens, experts]
    _, expert_index = jax.lax.top_k(jnp.where(eligible, biased, -jnp.inf), top_k)
    weights = jnp.take_along_axis(scores, expert_index, axis=-1)  # [tokens, top_k]
    if renormalize:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    weights = weights * scaling
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
    return Routing(
        expert_index=expert_index.astype(jnp.int32),
        combine_weights=weights,
        router_probs=probs,
        aux_losses={
            "load_balance": active_load_balance_loss(probs, weights, expert_index),
            "router_z": router_z_loss(logits),
        },
    )


SPEC = register(
    RouterSpec(
        "group_limited_sigmoid",
        group_limited_sigmoid,
        options=GroupLimitedOptions,
        state=EXPERT_BIAS_STATE,
    )
)
