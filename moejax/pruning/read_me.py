"""Read-ME (Cai et al., "Read-ME: Refactorizing LLMs as Router-Decoupled Mixture of Experts with
System Co-Design", 2024) as pure functions: a dense SwiGLU FFN (`w_gate, w_up [d_model, d_ff]`,
`w_down [d_ff, d_model]`) is split into equal experts of co-activating neurons (`moefy_ffn`),
and a router that reads only the token id, so that every layer's routing is known before the
layers run, is fitted to the oracle that sends each token to the experts holding its activation
mass (`oracle_expert_scores`, `fit_pregating_router`, `pregate`).

Offline, one-shot, float64 numpy, as `experts.py` (the reverse direction: fewer experts).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import linear_sum_assignment

from moejax.errors import require
from moejax.pruning.experts import check_expert_index


class MoEfiedFFN(NamedTuple):
    """`moefy_ffn`'s result: `weights` (`w_gate, w_up [experts, d_model, d_ff / experts]`,
    `w_down [experts, d_ff / experts, d_model]`) and `partition [experts, d_ff / experts]`, the
    dense FFN's neuron indices each expert holds (ascending)."""

    weights: dict[str, np.ndarray]
    partition: np.ndarray


# Routing statistics.


def moefy_ffn(
    w_gate: ArrayLike,
    w_up: ArrayLike,
    w_down: ArrayLike,
    hidden_activations: ArrayLike,
    num_experts: int,
    *,
    iterations: int = 20,
    seed: int = 0,
) -> MoEfiedFFN:
    """Read-ME's MoE-fication: a dense SwiGLU FFN (`w_gate, w_up [d_model, d_ff]`, `w_down
    [d_ff, d_model]`) split into `num_experts` experts of `d_ff / num_experts` neurons each,
    the neurons that fire together in the same expert.

    hidden_activations: `[tokens, d_ff]`, the FFN's hidden activations `silu(x @ w_gate) * (x
    @ w_up)` over calibration tokens. Each neuron is described by its |activation| over the
    tokens, scaled to unit length, and the neurons are clustered by balanced k-means
    (`balanced_neuron_partition`). Summing every expert's output gives the dense FFN's.
    Returns `MoEfiedFFN(weights, partition [experts, d_ff / experts])`, experts ordered by
    their lowest neuron.
    """
    w_gate, w_up, w_down = (np.asarray(w) for w in (w_gate, w_up, w_down))
    require(w_gate.ndim == 2, "w_gate.shape", w_gate.shape, "[d_model, d_ff]")
    d_model, d_ff = w_gate.shape
    require(w_up.shape == w_gate.shape, "w_up.shape", w_up.shape, f"w_gate's {w_gate.shape}")
    require(w_down.shape == (d_ff, d_model), "w_down.shape", w_down.shape, f"[{d_ff}, {d_model}]")
    activations = np.asarray(hidden_activations, np.float64)
    require(
        activations.ndim == 2 and activations.shape[1] == d_ff,
        "hidden_activations.shape",
        activations.shape,
        f"[tokens, d_ff={d_ff}]",
    )
    partition = balanced_neuron_partition(
        activations, num_experts, iterations=iterations, seed=seed
    )
    weights = {
        "w_gate": np.stack([w_gate[:, neurons] for neurons in partition]),
        "w_up": np.stack([w_up[:, neurons] for neurons in partition]),
        "w_down": np.stack([w_down[neurons, :] for neurons in partition]),
    }
    return MoEfiedFFN(weights, partition)


def balanced_neuron_partition(
    hidden_activations: ArrayLike, num_experts: int, *, iterations: int = 20, seed: int = 0
) -> np.ndarray:
    """The neurons of `hidden_activations [tokens, d_ff]` in `num_experts` equal groups of
    co-activating neurons, `[experts, d_ff / experts]` int64 (ascending within a group,
    groups ordered by their lowest neuron).

    Balanced k-means on the neurons' unit-length |activation| patterns over the tokens: the
    centroids start at mutually dissimilar neurons (a neuron drawn with `seed`, then each
    time the neuron least similar to those already chosen); each round assigns every neuron to a
    centroid by `linear_sum_assignment` with each centroid repeated `d_ff / experts` times (the
    most similar assignment in which every group is full), then moves each centroid to its
    group's mean, until the assignment stops changing or `iterations` rounds have run.
    """
    activations = np.asarray(hidden_activations, np.float64)
    require(activations.ndim == 2, "hidden_activations.shape", activations.shape, "[tokens, d_ff]")
    d_ff = activations.shape[1]
    require(
        isinstance(num_experts, int) and num_experts >= 1 and d_ff % num_experts == 0,
        "num_experts",
        num_experts,
        f"an int >= 1 dividing d_ff={d_ff}",
    )
    require(isinstance(iterations, int) and iterations >= 1, "iterations", iterations, ">= 1")
    size = d_ff // num_experts
    patterns = np.abs(activations.T)  # [d_ff, tokens]
    norms = np.linalg.norm(patterns, axis=1, keepdims=True)
    patterns = patterns / np.where(norms > 0, norms, 1.0)
    centroids = patterns[_farthest_neurons(patterns, num_experts, seed)]  # [experts, tokens]
    assignment = None
    for _ in range(iterations):
        similarity = patterns @ centroids.T  # [d_ff, experts]
        _, slots = linear_sum_assignment(np.repeat(similarity, size, axis=1), maximize=True)
        new = slots // size  # slot s belongs to centroid s // size
        if assignment is not None and np.array_equal(new, assignment):
            break
        assignment = new
        centroids = np.stack([patterns[assignment == e].mean(axis=0) for e in range(num_experts)])
    groups = [np.flatnonzero(assignment == e) for e in range(num_experts)]
    return np.stack(sorted(groups, key=lambda neurons: neurons[0]))


def oracle_expert_scores(hidden_activations: ArrayLike, partition: ArrayLike) -> np.ndarray:
    """Read-ME's routing oracle: each token's activation mass in each expert's neurons,
    `[tokens, experts]` float64 = the sum of |activation| over the neurons of `partition
    [experts, d_ff / experts]` (`moefy_ffn`), from `hidden_activations [tokens, d_ff]`."""
    activations = np.asarray(hidden_activations, np.float64)
    partition = np.asarray(partition)
    require(activations.ndim == 2, "hidden_activations.shape", activations.shape, "[tokens, d_ff]")
    d_ff = activations.shape[1]
    require(
        partition.ndim == 2
        and np.issubdtype(partition.dtype, np.integer)
        and np.array_equal(np.sort(partition.reshape(-1)), np.arange(d_ff)),
        "partition",
        partition.shape,
        f"int [experts, d_ff / experts] holding each of the d_ff={d_ff} neurons once",
    )
    return np.abs(activations)[:, partition].sum(axis=2)


def fit_pregating_router(
    token_ids: ArrayLike, targets: ArrayLike, vocab_size: int, num_experts: int
) -> np.ndarray:
    """Read-ME's pre-gating router, decoupled from the backbone: a table `[vocab_size,
    experts]` float64 of expert scores read by token id alone, so routing is known before the
    layer (or the whole model) runs; `pregate` turns it into `expert_index`.

    token_ids: `[tokens]` (flattened calibration batches). targets: integer `[tokens, top_k]`
    expert indices (e.g. the top-k of `oracle_expert_scores`) or floating `[tokens, experts]`
    scores (the oracle's, or a router's probabilities). A token id's row is the mean target
    over its occurrences (for indices, the share of its occurrences sent to each expert); an
    id absent from the calibration tokens gets the mean over all tokens.
    """
    require(isinstance(vocab_size, int) and vocab_size > 0, "vocab_size", vocab_size, "> 0")
    require(isinstance(num_experts, int) and num_experts > 0, "num_experts", num_experts, "> 0")
    ids = np.asarray(token_ids)
    require(
        ids.ndim == 1 and ids.shape[0] > 0 and np.issubdtype(ids.dtype, np.integer),
        "token_ids.shape",
        ids.shape,
        "int [tokens], at least one token",
    )
    require(
        np.all((ids >= 0) & (ids < vocab_size)),
        "token_ids",
        f"range [{ids.min()}, {ids.max()}]",
        f"ids in [0, vocab_size={vocab_size})",
    )
    targets = np.asarray(targets)
    if np.issubdtype(targets.dtype, np.integer):
        check_expert_index(targets, "targets", num_experts)
        scores = np.zeros((targets.shape[0], num_experts))
        np.add.at(scores, (np.arange(targets.shape[0])[:, None], targets), 1.0)
    else:
        require(
            targets.shape == (ids.shape[0], num_experts),
            "targets.shape",
            targets.shape,
            f"int [tokens, top_k] or float [tokens={ids.shape[0]}, experts={num_experts}]",
        )
        scores = targets.astype(np.float64)
    require(scores.shape[0] == ids.shape[0], "targets tokens", scores.shape[0], f"{ids.shape[0]}")
    totals = np.zeros((vocab_size, num_experts))
    np.add.at(totals, ids, scores)
    counts = np.bincount(ids, minlength=vocab_size)[:, None]
    return np.where(counts > 0, totals / np.maximum(counts, 1), scores.mean(axis=0))


def pregate(table: ArrayLike, token_ids: ArrayLike, top_k: int) -> np.ndarray:
    """The `top_k` experts of each token by the pre-gating `table [vocab_size, experts]`
    (`fit_pregating_router`), `expert_index [*token_ids.shape, top_k]` int64, best first."""
    table = np.asarray(table, np.float64)
    require(table.ndim == 2, "table.shape", table.shape, "[vocab_size, experts]")
    require(
        isinstance(top_k, int) and 1 <= top_k <= table.shape[1],
        "top_k",
        top_k,
        f"an int in [1, experts={table.shape[1]}]",
    )
    ids = np.asarray(token_ids)
    require(
        np.issubdtype(ids.dtype, np.integer) and np.all((ids >= 0) & (ids < table.shape[0])),
        "token_ids",
        ids.dtype,
        f"ints in [0, vocab_size={table.shape[0]})",
    )
    return np.argsort(-table[ids], axis=-1, kind="stable")[..., :top_k]


# Shared checks and helpers.


def _farthest_neurons(patterns: np.ndarray, count: int, seed: int) -> np.ndarray:
    """`count` rows of the unit vectors `patterns [d_ff, tokens]`: one drawn with `seed`, then
    each time the row whose highest similarity to the rows chosen so far is lowest."""
    chosen = [int(np.random.default_rng(seed).integers(patterns.shape[0]))]
    closest = patterns @ patterns[chosen[0]]  # [d_ff]
    for _ in range(count - 1):
        candidates = np.where(np.isin(np.arange(len(closest)), chosen), np.inf, closest)
        chosen.append(int(np.argmin(candidates)))
        closest = np.maximum(closest, patterns @ patterns[chosen[-1]])
    return np.array(chosen)
