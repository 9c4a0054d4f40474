"""Expert-level compression of trained MoE layers, as pure functions on stacked expert weights.

The weights are those of `MoELayer`: SwiGLU experts `silu(x @ w_gate) * (x @ w_up) @ w_down`
stacked as `w_gate, w_up [experts, d_model, d_ff]`, `w_down [experts, d_ff, d_model]`, and the
logit router `router [d_model, experts]`. The routing statistics come from the layer's `route`
over calibration tokens (`Routing.expert_index`, `Routing.router_probs`).

- Routing statistics: how often each expert is chosen (`expert_frequency`) and how much
  router probability it gets (`expert_importance`).
- Expert pruning (`prune_experts`): keep the highest-scoring experts and their router columns.
- MC-SMoE (Li et al., "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its
  Routing Policy", 2024): the most frequently chosen experts are dominant and every other
  expert joins the dominant expert whose router logits it resembles most (`dominant_groups`);
  each member's hidden neurons are permuted to match its dominant expert (`align_neurons`) and
  the group is averaged with activation-frequency weights (`merge_experts`, `merged_router`);
  then each merged weight is compressed to low rank plus sparse (`low_rank_plus_sparse`).
- Read-ME, the reverse (a dense FFN split into experts), is in `read_me.py`.

These are offline, one-shot computations: inputs may be numpy or jax arrays, the math runs in
float64 numpy (scipy's assignment solver is numpy's), and results are numpy arrays, the weights
in their input dtype. Ties between equal scores always go to the lower index.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import linear_sum_assignment

from moejax.errors import require

# The stacked SwiGLU weights of a MoE layer, by their `MoELayer` attribute names.
EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


class PrunedExperts(NamedTuple):
    """`prune_experts`'s result: `weights` (each `[keep, ...]`), `router [d_model, keep]` (None
    when none was given) and `kept [keep]`, the original indices of the kept experts."""

    weights: dict[str, np.ndarray]
    router: np.ndarray | None
    kept: np.ndarray


class MergedExperts(NamedTuple):
    """`merge_experts`'s result: `weights` (each `[num_groups, ...]`), `expert_to_group
    [experts]` (the merged expert that serves each original one) and `dominant [num_groups]`
    (each group's dominant original expert)."""

    weights: dict[str, np.ndarray]
    expert_to_group: np.ndarray
    dominant: np.ndarray


class LowRankSparse(NamedTuple):
    """`w ≈ u @ v + sparse`: `u [a, rank]`, `v [rank, b]`, `sparse [a, b]`."""

    u: np.ndarray
    v: np.ndarray
    sparse: np.ndarray


def expert_frequency(expert_index: ArrayLike, num_experts: int) -> np.ndarray:
    """The share of tokens routed to each expert, `[experts]` float64 in [0, 1] (summing to
    `top_k`), from `expert_index [tokens, top_k]` (a `Routing`'s, over calibration tokens).
    MC-SMoE calls it the activation frequency."""
    require(isinstance(num_experts, int) and num_experts > 0, "num_experts", num_experts, "> 0")
    index = np.asarray(expert_index)
    check_expert_index(index, "expert_index", num_experts)
    require(index.shape[0] > 0, "expert_index tokens", index.shape[0], "at least one token")
    return np.bincount(index.reshape(-1), minlength=num_experts) / index.shape[0]


def expert_importance(router_probs: ArrayLike) -> np.ndarray:
    """The sum over tokens of each expert's router probability (or dense combine weight),
    `[experts]` float64, from `router_probs [tokens, experts]`."""
    probs = np.asarray(router_probs, np.float64)
    require(probs.ndim == 2, "router_probs.shape", probs.shape, "[tokens, experts]")
    return probs.sum(axis=0)


# Expert pruning.


def prune_experts(
    weights: Mapping[str, ArrayLike],
    router: ArrayLike | None,
    scores: ArrayLike,
    keep: int,
) -> PrunedExperts:
    """Keeps the `keep` experts of highest `scores [experts]` (e.g. `expert_frequency` or
    `expert_importance`) in their original order.

    weights: name -> `[experts, ...]` stacked arrays (any names; `MoELayer`'s are
      `EXPERT_WEIGHTS`). router: `[d_model, experts]`, or None for a router without logits.
    Returns `PrunedExperts(weights [keep, ...], router [d_model, keep], kept [keep])`.
    """
    scores = np.asarray(scores, np.float64)
    require(scores.ndim == 1, "scores.shape", scores.shape, "[experts]")
    experts = scores.shape[0]
    require(
        isinstance(keep, int) and 1 <= keep <= experts, "keep", keep, f"an int in [1, {experts}]"
    )
    stacked = _stacked(weights, experts)
    kept = np.sort(_top(scores, keep))
    pruned = {name: value[kept] for name, value in stacked.items()}
    if router is None:
        return PrunedExperts(pruned, None, kept)
    router = _router(router, experts)
    return PrunedExperts(pruned, router[:, kept], kept)


# MC-SMoE: group, align, merge, compress.


def dominant_groups(router_logits: ArrayLike, frequency: ArrayLike, num_groups: int) -> np.ndarray:
    """MC-SMoE's grouping: the group of each expert, `[experts]` int64 in [0, num_groups).

    The `num_groups` experts of highest `frequency [experts]` are dominant, one per group,
    numbered in the dominant experts' original order. Every other expert joins the dominant
    expert whose column of `router_logits [tokens, experts]` (the router logits over the
    calibration tokens) has the highest cosine similarity to its own. Any `[features, experts]`
    matrix of per-expert vectors works in place of the logits (the router weight `[d_model,
    experts]` compares the experts without calibration tokens).
    """
    logits = np.asarray(router_logits, np.float64)
    frequency = np.asarray(frequency, np.float64)
    require(logits.ndim == 2, "router_logits.shape", logits.shape, "[tokens, experts]")
    experts = logits.shape[1]
    require(frequency.shape == (experts,), "frequency.shape", frequency.shape, f"[{experts}]")
    require(
        isinstance(num_groups, int) and 1 <= num_groups <= experts,
        "num_groups",
        num_groups,
        f"an int in [1, experts={experts}]",
    )
    dominant = np.sort(_top(frequency, num_groups))
    norms = np.linalg.norm(logits, axis=0)
    unit = logits / np.where(norms > 0, norms, 1.0)
    similarity = unit.T @ unit[:, dominant]  # [experts, num_groups]
    groups = np.argmax(similarity, axis=1)
    groups[dominant] = np.arange(num_groups)
    return groups


def align_neurons(reference: Mapping[str, ArrayLike], other: Mapping[str, ArrayLike]) -> np.ndarray:
    """The permutation `[d_ff]` of `other`'s hidden neurons that best matches `reference`'s
    (MC-SMoE's neuron alignment; weight matching as in Git Re-Basin).

    reference, other: one SwiGLU expert each, `w_gate, w_up [d_model, d_ff]`, `w_down [d_ff,
    d_model]`. Neuron j's weight vector is `(w_gate[:, j], w_up[:, j], w_down[j, :])`; the
    permutation maximises the summed inner products of matched neurons, which minimises the
    squared distance between `reference` and `permute_neurons(other, permutation)` (the
    norms do not depend on the order). Solved exactly by `linear_sum_assignment`.
    """
    ref = _neuron_vectors(reference, "reference")
    oth = _neuron_vectors(other, "other")
    require(oth.shape == ref.shape, "other shapes", oth.shape, f"reference's {ref.shape}")
    _, permutation = linear_sum_assignment(ref @ oth.T, maximize=True)
    return permutation


def permute_neurons(
    expert: Mapping[str, ArrayLike], permutation: ArrayLike
) -> dict[str, np.ndarray]:
    """The same SwiGLU expert (`w_gate, w_up [d_model, d_ff]`, `w_down [d_ff, d_model]`) with
    its hidden neurons reordered: new neuron j is old neuron `permutation[j]`. The expert's
    function does not change."""
    _check_expert(expert, "expert")
    permutation = np.asarray(permutation)
    d_ff = np.shape(expert["w_down"])[0]
    require(
        permutation.shape == (d_ff,) and np.array_equal(np.sort(permutation), np.arange(d_ff)),
        "permutation",
        permutation.tolist(),
        f"a permutation of range({d_ff})",
    )
    return {
        "w_gate": np.asarray(expert["w_gate"])[:, permutation],
        "w_up": np.asarray(expert["w_up"])[:, permutation],
        "w_down": np.asarray(expert["w_down"])[permutation, :],
    }


def merge_experts(
    weights: Mapping[str, ArrayLike], groups: ArrayLike, frequency: ArrayLike
) -> MergedExperts:
    """MC-SMoE's merge: one SwiGLU expert per group.

    weights: `EXPERT_WEIGHTS` stacked, `w_gate, w_up [experts, d_model, d_ff]`, `w_down
    [experts, d_ff, d_model]`. groups: `[experts]` ints covering every id in [0, num_groups)
    (`dominant_groups`). frequency: `[experts]` (`expert_frequency`). Each group's dominant
    expert is its most frequent member; every other member's neurons are aligned to it
    (`align_neurons`), then the group's weights are averaged with weights proportional to
    `frequency` (uniform over the group when its frequencies are all zero). Returns
    `MergedExperts(weights [num_groups, ...], expert_to_group [experts], dominant
    [num_groups])`.
    """
    require(set(weights) == set(EXPERT_WEIGHTS), "weights names", sorted(weights), EXPERT_WEIGHTS)
    frequency = np.asarray(frequency, np.float64)
    require(frequency.ndim == 1, "frequency.shape", frequency.shape, "[experts]")
    experts = frequency.shape[0]
    stacked = _stacked(weights, experts)
    _check_expert({name: value[0] for name, value in stacked.items()}, "weights")
    require(np.all(frequency >= 0), "frequency", frequency.tolist(), "values >= 0")
    groups = _check_groups(groups, experts)
    dominant = _dominants(groups, frequency)
    merged = {name: [] for name in EXPERT_WEIGHTS}
    for group, lead in enumerate(dominant):
        members = np.flatnonzero(groups == group)
        reference = {name: stacked[name][lead] for name in EXPERT_WEIGHTS}
        share = frequency[members]
        share = share / share.sum() if share.sum() > 0 else np.full(len(members), 1 / len(members))
        aligned = []
        for member in members:
            expert = {name: stacked[name][member] for name in EXPERT_WEIGHTS}
            if member != lead:
                expert = permute_neurons(expert, align_neurons(reference, expert))
            aligned.append(expert)
        for name in EXPERT_WEIGHTS:
            # [members] x [members, ...] -> [...], in float64
            merged[name].append(np.tensordot(share, np.stack([e[name] for e in aligned]), 1))
    out = {
        name: np.stack(merged[name]).astype(np.asarray(weights[name]).dtype)
        for name in EXPERT_WEIGHTS
    }
    return MergedExperts(out, groups, dominant)


def merged_router(router: ArrayLike, groups: ArrayLike, frequency: ArrayLike) -> np.ndarray:
    """The router `[d_model, num_groups]` of the merged experts for a layer that keeps a
    fixed top-k over the merged experts: group g's column is its dominant expert's column of
    `router [d_model, experts]` (the dominant expert as in `merge_experts`).

    MC-SMoE itself keeps the original router and maps each chosen expert to its group
    (`expert_to_group[expert_index]`). A router over the groups has to pick one logit per
    group: the dominant expert's column keeps exactly the logits of the expert that received
    most of the group's tokens, and the other members joined the group because their logits
    point the same way (`dominant_groups`). Averaging the members' columns would shrink the
    logits' scale wherever they differ, flattening the softmax.
    """
    frequency = np.asarray(frequency, np.float64)
    require(frequency.ndim == 1, "frequency.shape", frequency.shape, "[experts]")
    experts = frequency.shape[0]
    router = _router(router, experts)
    groups = _check_groups(groups, experts)
    return router[:, _dominants(groups, frequency)]


def low_rank_plus_sparse(
    w: ArrayLike, rank: int, sparsity: float, *, iterations: int = 5
) -> LowRankSparse:
    """MC-SMoE's "then compress": `w [a, b] ≈ u @ v + sparse`, `u [a, rank]`, `v [rank, b]`,
    `sparse [a, b]` with a `sparsity` share of zeros (exactly `int(sparsity * a * b)`).

    Alternates `iterations` times: the low-rank part is the truncated SVD of `w - sparse`
    (split evenly, `u = U √s`, `v = √s Vᵀ`), and `sparse` keeps the largest-magnitude entries
    of the residual `w - u @ v`. It runs from two starts and returns the fit of lower error:
    `sparse = 0` suits dense weights, and `sparse` = the largest entries of `w` keeps a few
    outlier weights out of the first SVD, which would otherwise absorb them. At `rank = min(a,
    b)` the result is exact.
    """
    w = np.asarray(w)
    require(w.ndim == 2, "w.shape", w.shape, "[a, b]")
    limit = min(w.shape)
    require(isinstance(rank, int) and 0 <= rank <= limit, "rank", rank, f"an int in [0, {limit}]")
    require(0.0 <= sparsity <= 1.0, "sparsity", sparsity, "a share in [0, 1]")
    require(isinstance(iterations, int) and iterations >= 1, "iterations", iterations, ">= 1")
    target = w.astype(np.float64)
    keep = target.size - int(sparsity * target.size)
    starts = (np.zeros_like(target), _largest_entries(target, keep))
    fits = [_alternate(target, rank, keep, sparse, iterations) for sparse in starts]
    u, v, sparse = min(fits, key=lambda fit: np.linalg.norm(target - fit.u @ fit.v - fit.sparse))
    return LowRankSparse(u.astype(w.dtype), v.astype(w.dtype), sparse.astype(w.dtype))


def _alternate(
    target: np.ndarray, rank: int, keep: int, sparse: np.ndarray, iterations: int
) -> LowRankSparse:
    for _ in range(iterations):
        left, singular, right = np.linalg.svd(target - sparse, full_matrices=False)
        root = np.sqrt(singular[:rank])
        u, v = left[:, :rank] * root, root[:, None] * right[:rank]
        sparse = _largest_entries(target - u @ v, keep)
    return LowRankSparse(u, v, sparse)


def _largest_entries(x: np.ndarray, keep: int) -> np.ndarray:
    """`x` with all but its `keep` largest-magnitude entries set to zero."""
    flat = np.zeros(x.size)
    largest = _top(np.abs(x).reshape(-1), keep)
    flat[largest] = x.reshape(-1)[largest]
    return flat.reshape(x.shape)


# Read-ME: MoE-fy a dense FFN and route before the layers run.


def _top(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` highest `scores`, best first, lower index first on ties."""
    return np.argsort(-scores, kind="stable")[:count]


def check_expert_index(index: np.ndarray, field: str, num_experts: int) -> None:
    require(
        index.ndim == 2 and np.issubdtype(index.dtype, np.integer),
        f"{field}.shape",
        index.shape,
        "int [tokens, top_k]",
    )
    require(
        index.size == 0 or (index.min() >= 0 and index.max() < num_experts),
        field,
        f"range [{index.min()}, {index.max()}]" if index.size else "empty",
        f"expert ids in [0, num_experts={num_experts})",
    )


def _stacked(weights: Mapping[str, ArrayLike], experts: int) -> dict[str, np.ndarray]:
    require(len(weights) > 0, "weights", {}, "a dict of stacked [experts, ...] arrays")
    stacked = {name: np.asarray(value) for name, value in weights.items()}
    for name, value in stacked.items():
        require(
            value.ndim >= 1 and value.shape[0] == experts,
            f"weights[{name!r}].shape",
            value.shape,
            f"[experts={experts}, ...]",
        )
    return stacked


def _router(router: ArrayLike, experts: int) -> np.ndarray:
    router = np.asarray(router)
    require(
        router.ndim == 2 and router.shape[1] == experts,
        "router.shape",
        router.shape,
        f"[d_model, experts={experts}]",
    )
    return router


def _check_expert(expert: Mapping[str, ArrayLike], field: str) -> None:
    require(set(expert) == set(EXPERT_WEIGHTS), f"{field} names", sorted(expert), EXPERT_WEIGHTS)
    gate, up, down = (np.shape(expert[name]) for name in EXPERT_WEIGHTS)
    require(len(gate) == 2, f"{field}['w_gate'].shape", gate, "[d_model, d_ff]")
    require(up == gate, f"{field}['w_up'].shape", up, f"w_gate's {gate}")
    require(down == gate[::-1], f"{field}['w_down'].shape", down, f"{list(gate[::-1])}")


def _neuron_vectors(expert: Mapping[str, ArrayLike], field: str) -> np.ndarray:
    """`[d_ff, 3 * d_model]`: each hidden neuron's gate, up and down weights."""
    _check_expert(expert, field)
    gate, up, down = (np.asarray(expert[name], np.float64) for name in EXPERT_WEIGHTS)
    return np.concatenate([gate.T, up.T, down], axis=1)


def _check_groups(groups: ArrayLike, experts: int) -> np.ndarray:
    groups = np.asarray(groups)
    require(
        groups.shape == (experts,) and np.issubdtype(groups.dtype, np.integer),
        "groups.shape",
        groups.shape,
        f"int [experts={experts}]",
    )
    present = np.unique(groups)
    require(
        np.array_equal(present, np.arange(len(present))),
        "groups",
        groups.tolist(),
        "ids covering every group 0..num_groups-1",
    )
    return groups.astype(np.int64)


def _dominants(groups: np.ndarray, frequency: np.ndarray) -> np.ndarray:
    """`[num_groups]`: each group's most frequent member (its lowest index on ties), the
    dominant expert `dominant_groups` chose for it."""
    dominant = []
    for group in range(int(groups.max()) + 1):
        members = np.flatnonzero(groups == group)
        dominant.append(members[_top(frequency[members], 1)[0]])
    return np.array(dominant)
