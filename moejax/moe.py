"""Mixture-of-experts feed-forward math: SwiGLU experts and interchangeable dispatch strategies.

Every strategy maps `(x [tokens, d_model], routing, expert_params) -> y [tokens, d_model]` and
all agree when no assignment is dropped. Expert parameters are a dict

    {"w_gate": [experts, d_model, d_ff], "w_up": [experts, d_model, d_ff],
     "w_down": [experts, d_ff, d_model]}

and each expert is the SwiGLU MLP `(silu(x @ w_gate) * (x @ w_up)) @ w_down` of Shazeer,
"GLU Variants Improve Transformer" (2020). Computation runs in x's dtype (parameters are cast to
it, as a Flax layer's `dtype` does) with matmuls accumulated in at least float32.
"""

import dataclasses
import math
from fractions import Fraction

import jax
import jax.numpy as jnp

from kernels_pallas import gmm
from moejax.routing import Routing

ExpertParams = dict[str, jax.Array]

DISPATCH_STRATEGIES = ("capacity", "dropless")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoEOutput:
    """Result of `moe_ffn`.

    Attributes:
      y: [tokens, d_model], same dtype as the input.
      dropped_fraction: scalar float32, share of the tokens * top_k assignments that were
        dropped for lack of expert capacity (always 0 for "dropless").
    """

    y: jax.Array
    dropped_fraction: jax.Array


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Slots per expert: `ceil(num_tokens * top_k * capacity_factor / num_experts)`, at least 1.

    Lepikhin et al., "GShard: Scaling Giant Models with Conditional Computation and Automatic
    Sharding" (2020). `capacity_factor=1` fits a perfectly balanced routing exactly.
    """
    if not (math.isfinite(capacity_factor) and capacity_factor > 0):
        raise ValueError(f"capacity_factor: got {capacity_factor}; allowed: finite and > 0")
    if num_experts < 1:
        raise ValueError(f"num_experts: got {num_experts}; allowed: >= 1")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: got {top_k}; allowed: 1 <= top_k <= num_experts={num_experts}")
    # Fraction(str(.)) reads 1.1 as 11/10, so 10 tokens * 1.1 give 11 slots, not the 12 that
    # float round-off (11.000000000000002) would round up to.
    slots = Fraction(num_tokens * top_k) * Fraction(str(capacity_factor)) / num_experts
    return max(1, math.ceil(slots))


def capacity_dispatch(
    x: jax.Array, routing: Routing, expert_params: ExpertParams, *, capacity: int
) -> tuple[jax.Array, jax.Array]:
    """Fixed-capacity expert buffers filled and emptied with one-hot einsums.

    Lepikhin et al., "GShard" (2020); Fedus et al., "Switch Transformers" (2021). Assignments
    take buffer slots in priority order: every token's first choice, in token order, before any
    second choice. Assignments that find their expert's `capacity` slots full are dropped: they
    contribute zero and are counted. The dispatch and combine tensors are
    [tokens, experts, capacity], so memory grows as tokens**2 * top_k * capacity_factor.

    Args:
      x: [tokens, d_model].
      routing: expert_index and combine_weights [tokens, top_k].
      expert_params: see the module docstring.
      capacity: slots per expert (see `expert_capacity`).

    Returns:
      y: [tokens, d_model] in x's dtype, and dropped_fraction: scalar float32.
    """
    num_experts = _check_inputs(x, routing, expert_params)
    if capacity < 1:
        raise ValueError(f"capacity: got {capacity}; allowed: >= 1")
    num_tokens, top_k = routing.expert_index.shape
    # Choice-major order ([top_k, tokens]) so a running count per expert yields each
    # assignment's slot in priority order.
    choice_major = jax.nn.one_hot(routing.expert_index.T, num_experts, dtype=jnp.int32)
    priority_mask = choice_major.reshape(top_k * num_tokens, num_experts)  # [k*tokens, experts]
    slot = jnp.cumsum(priority_mask, axis=0) - 1  # [k*tokens, experts]
    slot = jnp.sum(slot * priority_mask, axis=-1)  # [k*tokens]
    slot = slot.reshape(top_k, num_tokens).T  # [tokens, top_k]
    dropped_fraction = jnp.mean((slot >= capacity).astype(jnp.float32))

    # one_hot of an index >= capacity is all zeros, which is exactly what drops the assignment.
    slot_mask = jax.nn.one_hot(slot, capacity, dtype=x.dtype)  # [tokens, top_k, capacity]
    expert_mask = jax.nn.one_hot(routing.expert_index, num_experts, dtype=x.dtype)
    dispatch = jnp.einsum("tke,tkc->tec", expert_mask, slot_mask)  # [tokens, experts, capacity]
    weighted_expert_mask = expert_mask * routing.combine_weights.astype(x.dtype)[..., None]
    combine = jnp.einsum("tke,tkc->tec", weighted_expert_mask, slot_mask)  # [tokens, e, capacity]

    # One nonzero term per output, so dispatch is exact in any dtype.
    expert_inputs = jnp.einsum("tec,td->ecd", dispatch, x)  # [experts, capacity, d_model]
    expert_outputs = _swiglu_batched(expert_inputs, expert_params)  # [experts, capacity, d_model]
    y = _einsum("tec,ecd->td", combine, expert_outputs)  # [tokens, d_model]
    return y, dropped_fraction


def dropless_dispatch(
    x: jax.Array, routing: Routing, expert_params: ExpertParams, *, gmm_impl: str = "auto"
) -> tuple[jax.Array, jax.Array]:
    """Sort assignments by expert and run every expert with grouped matmuls; nothing is dropped.

    Gale et al., "MegaBlocks: Efficient Sparse Training with Mixture-of-Experts" (2022). The
    tokens * top_k assignments are stably sorted by expert, their rows gathered, the SwiGLU run
    as three `kernels_pallas.gmm` calls, and the outputs unsorted and summed back per token with
    the combine weights. Shapes are static, so it jits; it differentiates in x, the expert
    parameters and the combine weights.

    Args:
      x: [tokens, d_model].
      routing: expert_index and combine_weights [tokens, top_k].
      expert_params: see the module docstring.
      gmm_impl: `impl` passed to `kernels_pallas.gmm`.

    Returns:
      y: [tokens, d_model] in x's dtype, and dropped_fraction: scalar float32, always 0.
    """
    num_experts = _check_inputs(x, routing, expert_params)
    num_tokens, top_k = routing.expert_index.shape
    params = _cast_params(expert_params, x.dtype)
    flat_expert = routing.expert_index.reshape(-1)  # [tokens*k], token-major
    # Stable, so each expert's rows keep token order and results do not depend on sort ties.
    order = jnp.argsort(flat_expert, stable=True)  # [tokens*k]
    sorted_rows = x[order // top_k]  # [tokens*k, d_model]
    group_sizes = jnp.bincount(flat_expert, length=num_experts).astype(jnp.int32)  # [experts]

    gate = gmm(sorted_rows, params["w_gate"], group_sizes, impl=gmm_impl)  # [tokens*k, d_ff]
    up = gmm(sorted_rows, params["w_up"], group_sizes, impl=gmm_impl)  # [tokens*k, d_ff]
    hidden = jax.nn.silu(gate) * up
    sorted_out = gmm(hidden, params["w_down"], group_sizes, impl=gmm_impl)  # [tokens*k, d_model]

    # Unsorting by gathering with the inverse permutation turns the sum over a token's experts
    # into a reshape and a reduction: deterministic, unlike a scatter-add.
    inverse_order = jnp.argsort(order)  # [tokens*k]
    out = sorted_out[inverse_order].reshape(num_tokens, top_k, -1)  # [tokens, k, d_model]
    y = _einsum("tkd,tk->td", out, routing.combine_weights.astype(x.dtype))  # [tokens, d_model]
    return y, jnp.zeros((), jnp.float32)


def moe_ffn(
    x: jax.Array,
    routing: Routing,
    expert_params: ExpertParams,
    *,
    strategy: str,
    capacity_factor: float = 1.25,
    gmm_impl: str = "auto",
) -> MoEOutput:
    """The routed-experts feed-forward block with a dispatch strategy chosen by name.

    Args:
      x: [tokens, d_model].
      routing: from a router in `moejax.routing`.
      expert_params: see the module docstring.
      strategy: one of `DISPATCH_STRATEGIES`.
      capacity_factor: slots per expert relative to a perfectly balanced load ("capacity" only).
      gmm_impl: grouped matmul implementation ("dropless" only).

    Returns:
      `MoEOutput` with y [tokens, d_model] and the dropped fraction.
    """
    if strategy not in DISPATCH_STRATEGIES:
        raise ValueError(
            f"strategy: unknown value {strategy!r}; allowed: {', '.join(DISPATCH_STRATEGIES)}"
        )
    num_experts = _check_inputs(x, routing, expert_params)
    if strategy == "capacity":
        num_tokens, top_k = routing.expert_index.shape
        capacity = expert_capacity(num_tokens, num_experts, top_k, capacity_factor)
        y, dropped_fraction = capacity_dispatch(x, routing, expert_params, capacity=capacity)
    else:
        y, dropped_fraction = dropless_dispatch(x, routing, expert_params, gmm_impl=gmm_impl)
    return MoEOutput(y=y, dropped_fraction=dropped_fraction)


def _swiglu_batched(expert_inputs: jax.Array, expert_params: ExpertParams) -> jax.Array:
    """Every expert on its own buffer: [experts, capacity, d_model] -> same shape."""
    params = _cast_params(expert_params, expert_inputs.dtype)
    gate = _einsum("ecd,edf->ecf", expert_inputs, params["w_gate"])  # [experts, capacity, d_ff]
    up = _einsum("ecd,edf->ecf", expert_inputs, params["w_up"])  # [experts, capacity, d_ff]
    hidden = jax.nn.silu(gate) * up
    return _einsum("ecf,efd->ecd", hidden, params["w_down"])  # [experts, capacity, d_model]


def _einsum(spec: str, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """einsum accumulated in at least float32 and returned in lhs's dtype, like `gmm`."""
    accumulate_dtype = jnp.promote_types(lhs.dtype, jnp.float32)
    return jnp.einsum(spec, lhs, rhs, preferred_element_type=accumulate_dtype).astype(lhs.dtype)


def _cast_params(expert_params: ExpertParams, dtype: jnp.dtype) -> ExpertParams:
    return {name: expert_params[name].astype(dtype) for name in ("w_gate", "w_up", "w_down")}


def _check_inputs(x: jax.Array, routing: Routing, expert_params: ExpertParams) -> int:
    """Validates shapes shared by every strategy and returns num_experts."""
    if x.ndim != 2:
        raise ValueError(f"x: expected [tokens, d_model], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x: dtype must be floating, got {x.dtype}")
    missing = {"w_gate", "w_up", "w_down"} - set(expert_params)
    if missing:
        raise ValueError(f"expert_params: missing {sorted(missing)}; got {sorted(expert_params)}")
    if expert_params["w_gate"].ndim != 3:
        raise ValueError(
            f"expert_params['w_gate']: expected [experts, d_model, d_ff], "
            f"got shape {expert_params['w_gate'].shape}"
        )
    num_tokens, d_model = x.shape
    num_experts, _, d_ff = expert_params["w_gate"].shape
    expected = {
        "w_gate": (num_experts, d_model, d_ff),
        "w_up": (num_experts, d_model, d_ff),
        "w_down": (num_experts, d_ff, d_model),
    }
    for name, shape in expected.items():
        if expert_params[name].shape != shape:
            raise ValueError(
                f"expert_params[{name!r}]: expected shape {shape} for x of shape {x.shape}, "
                f"got {expert_params[name].shape}"
            )
    if routing.expert_index.ndim != 2 or routing.expert_index.shape[0] != num_tokens:
        raise ValueError(
            f"routing.expert_index: expected [tokens={num_tokens}, top_k], "
            f"got shape {routing.expert_index.shape}"
        )
    if routing.combine_weights.shape != routing.expert_index.shape:
        raise ValueError(
            f"routing.combine_weights: shape {routing.combine_weights.shape} differs from "
            f"expert_index's {routing.expert_index.shape}"
        )
    return num_experts
