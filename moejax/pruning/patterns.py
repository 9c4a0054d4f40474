"""Sparsity patterns: functions from scores to boolean keep-masks of the same shape.

Every pattern keeps the highest-scoring entries (or groups of entries) and prunes exactly the
number the pattern asks for: `round(sparsity * count)` entries, blocks, slices or layers. Ties are
broken by position (the stable sort order), so the count is exact even for constant scores.
Already-pruned entries should be passed with score `-inf` (`masked_scores`) so that a higher
sparsity never revives them.

`sparsity` may be a traced scalar (a schedule inside `jit`): ranks are computed by sorting, never
with a static `top_k`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from moejax.errors import require
from moejax.pruning.base import PatternSpec, PruningOptions, register
from moejax.pruning.scores import erk_densities


def _check_sparsity(sparsity: float | jax.Array) -> None:
    require(
        not isinstance(sparsity, int | float) or 0.0 <= sparsity <= 1.0,
        "sparsity",
        sparsity,
        "in [0, 1]",
    )


def masked_scores(scores: jax.Array, mask: jax.Array | None) -> jax.Array:
    """`scores` with the entries that `mask` already prunes set to -inf (shapes equal)."""
    scores = scores.astype(jnp.float32)
    if mask is None:
        return scores
    return jnp.where(mask.astype(bool), scores, -jnp.inf)


def _keep_count(count: int, sparsity: float | jax.Array) -> jax.Array:
    """How many of `count` entries survive `sparsity`: `count - round(sparsity * count)`."""
    return count - jnp.round(jnp.asarray(sparsity, jnp.float32) * count).astype(jnp.int32)


def _keep_top_rows(scores: jax.Array, keep: jax.Array) -> jax.Array:
    """Keeps the `keep` highest scores of each row. scores: [rows, n] -> bool [rows, n]."""
    order = jnp.argsort(-scores, axis=-1, stable=True)  # [rows, n]
    ranks = jnp.argsort(order, axis=-1, stable=True)  # [rows, n]: 0 = highest score
    return ranks < keep


def unstructured_mask(
    scores: jax.Array, sparsity: float | jax.Array, *, per_slice_axis: int | None = None
) -> jax.Array:
    """Prunes the lowest-scoring single entries.

    scores: any shape -> bool mask of that shape. With `per_slice_axis=None` the whole tensor
    competes; with an axis, each slice `scores[..., j, ...]` along it loses the same fraction
    (Wanda's per-output comparison group is the output axis of a kernel).
    """
    _check_sparsity(sparsity)
    return _unstructured_mask(scores, sparsity, per_slice_axis)


# Jitted as a whole: op-by-op dispatch of the two sorts is slow for large layers.
@functools.partial(jax.jit, static_argnums=(2,))
def _unstructured_mask(scores: jax.Array, sparsity, per_slice_axis: int | None) -> jax.Array:
    if per_slice_axis is None:
        flat = scores.reshape(1, -1)  # [1, size]
        return _keep_top_rows(flat, _keep_count(flat.shape[1], sparsity)).reshape(scores.shape)
    moved = jnp.moveaxis(scores, per_slice_axis, 0)
    rows = moved.reshape(moved.shape[0], -1)  # [slices, entries per slice]
    keep = _keep_top_rows(rows, _keep_count(rows.shape[1], sparsity))
    return jnp.moveaxis(keep.reshape(moved.shape), 0, per_slice_axis)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def nm_mask(scores: jax.Array, n: int, m: int, axis: int = -1) -> jax.Array:
    """N:M sparsity: in every group of `m` consecutive entries along `axis`, keep the `n` best.

    *Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch.*
    scores: [..., d, ...] with `d = scores.shape[axis]` a multiple of `m` -> bool, same shape.
    For a Flax kernel `[d_in, d_out]` the hardware-friendly groups run along `d_in` (axis 0).
    """
    require(0 < n <= m, "n", n, f"0 < n <= m={m}")
    require(scores.ndim > 0, "scores shape", scores.shape, "an array with the n:m axis")
    size = scores.shape[axis]
    require(size % m == 0, f"axis {axis} size", size, f"a multiple of m={m}")
    moved = jnp.moveaxis(scores, axis, -1)
    groups = moved.reshape(-1, m)  # [groups, m]
    keep = _keep_top_rows(groups, jnp.int32(n))
    return jnp.moveaxis(keep.reshape(moved.shape), -1, axis)


def _blocks(x: jax.Array, block_shape: tuple[int, int]) -> jax.Array:
    """x: [..., rows, cols] -> [..., rows/bh, cols/bw, bh, bw]."""
    bh, bw = block_shape
    *lead, rows, cols = x.shape
    require(
        rows % bh == 0 and cols % bw == 0,
        "block_shape",
        block_shape,
        f"tiles that divide the last two dims {(rows, cols)}",
    )
    x = x.reshape(*lead, rows // bh, bh, cols // bw, bw)
    return jnp.swapaxes(x, -3, -2)


def block_mask(
    scores: jax.Array, sparsity: float | jax.Array, block_shape: tuple[int, int]
) -> jax.Array:
    """Prunes whole `block_shape` tiles of the last two dims, the tiles with the lowest summed
    score first. scores: [..., rows, cols] (tiles of all leading dims compete) -> bool, same
    shape; every tile is all kept or all pruned."""
    _check_sparsity(sparsity)
    require(scores.ndim >= 2, "scores shape", scores.shape, ">= 2 dims for block pruning")
    tiles = _blocks(scores, block_shape)  # [..., rows/bh, cols/bw, bh, bw]
    tile_scores = tiles.sum(axis=(-2, -1))
    keep_tiles = unstructured_mask(tile_scores, sparsity)  # [..., rows/bh, cols/bw]
    keep = jnp.broadcast_to(keep_tiles[..., None, None], tiles.shape)
    keep = jnp.swapaxes(keep, -3, -2)  # [..., rows/bh, bh, cols/bw, bw]
    return keep.reshape(scores.shape)


def slice_mask(scores: jax.Array, sparsity: float | jax.Array, axis: int) -> jax.Array:
    """Prunes whole slices along `axis`, lowest summed score first: output neurons (axis -1 of a
    dense kernel `[d_in, d_out]`), conv channels (axis -1 of `[kh, kw, c_in, c_out]`) or experts
    (axis 0 of stacked expert weights `[experts, d, f]`). Returns bool, same shape as scores."""
    _check_sparsity(sparsity)
    axis = axis % scores.ndim
    other = tuple(i for i in range(scores.ndim) if i != axis)
    slice_scores = scores.sum(axis=other)  # [scores.shape[axis]]
    keep = unstructured_mask(slice_scores, sparsity)
    shape = [1] * scores.ndim
    shape[axis] = scores.shape[axis]
    return jnp.broadcast_to(keep.reshape(shape), scores.shape)


def expert_masks(
    expert_params: dict[str, jax.Array],
    sparsity: float | jax.Array,
    expert_scores: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Prunes whole experts, the same experts in every weight of the expert MLP.

    expert_params: {"w_gate": [experts, d, f], "w_up": [experts, d, f], "w_down": [experts, f,
    d]} (any names; all stacked on axis 0). expert_scores: [experts], e.g. routing frequency;
    None scores each expert by the L2 norm of all its weights. Returns bool masks like the params.
    """
    sizes = {name: w.shape[0] for name, w in expert_params.items()}
    require(len(set(sizes.values())) == 1, "expert_params", sizes, "equal leading (expert) dims")
    num_experts = next(iter(sizes.values()))
    if expert_scores is None:
        squares = [
            jnp.sum(jnp.square(w.astype(jnp.float32)).reshape(num_experts, -1), axis=1)
            for w in expert_params.values()
        ]
        expert_scores = jnp.sqrt(sum(squares))  # [experts]
    require(
        expert_scores.shape == (num_experts,),
        "expert_scores",
        expert_scores.shape,
        f"({num_experts},)",
    )
    keep = unstructured_mask(expert_scores.astype(jnp.float32), sparsity)  # [experts]
    return {
        name: jnp.broadcast_to(keep.reshape((num_experts,) + (1,) * (w.ndim - 1)), w.shape)
        for name, w in expert_params.items()
    }


def global_unstructured_masks(scores: list[jax.Array], sparsity: float | jax.Array):
    """One threshold over all tensors: the lowest `round(sparsity * total)` entries of the
    concatenation are pruned, wherever they are. Returns bool masks shaped like `scores`."""
    _check_sparsity(sparsity)
    flat = jnp.concatenate([s.reshape(-1).astype(jnp.float32) for s in scores])
    keep = unstructured_mask(flat, sparsity)
    offsets = [0]
    for s in scores:
        offsets.append(offsets[-1] + math.prod(s.shape))
    return [
        keep[start:stop].reshape(s.shape)
        for s, start, stop in zip(scores, offsets[:-1], offsets[1:], strict=True)
    ]


def layer_masks(scores: list[jax.Array], sparsity: float) -> list[jax.Array]:
    """Prunes whole tensors (layers): the `round(sparsity * len(scores))` tensors with the lowest
    mean score are removed entirely (*When Layers Play the Lottery, all Tickets Win at
    Initialization* prunes layers; the mean score is our ranking). Returns bool masks."""
    _check_sparsity(sparsity)
    means = jnp.stack([jnp.mean(s.astype(jnp.float32)) for s in scores])  # [layers]
    keep = unstructured_mask(means, sparsity)
    return [jnp.broadcast_to(keep[i], s.shape) for i, s in enumerate(scores)]


# --- the registered patterns -------------------------------------------------------------
# Each turns the ranked scores of all prunable leaves (a list, `names` their paths) into masks.


@dataclasses.dataclass(frozen=True)
class UnstructuredOptions(PruningOptions):
    """Options of the "unstructured" pattern.

    Attributes:
      scope: "layer" gives each tensor its own sparsity (`density` says which), "global" ranks
        all prunable entries together.
      density: per-tensor densities when scope="layer": "uniform" (every tensor at the target)
        or "erk" (Erdos-Renyi-Kernel proportions, *Rigging the Lottery*).
    """

    scope: str = "layer"
    density: str = "uniform"

    def __post_init__(self) -> None:
        require(self.scope in SCOPES, "scope", self.scope, ", ".join(SCOPES))
        require(
            self.density in DENSITY_ALLOCATIONS,
            "density",
            self.density,
            ", ".join(DENSITY_ALLOCATIONS),
        )


def _layer_unstructured(scores, sparsity, density: str) -> list[jax.Array]:
    sparsities = DENSITY_ALLOCATIONS[density]([s.shape for s in scores], sparsity)
    return [unstructured_mask(s, sparsities[i]) for i, s in enumerate(scores)]


def _global_unstructured(scores, sparsity, density: str) -> list[jax.Array]:
    del density  # one threshold over all tensors: no per-tensor allocation
    return global_unstructured_masks(scores, sparsity)


def _uniform_sparsities(shapes, sparsity) -> list:
    return [sparsity] * len(shapes)


def _erk_sparsities(shapes, sparsity) -> jax.Array:
    return 1.0 - erk_densities(shapes, 1.0 - sparsity)


# Per-tensor sparsities for the shapes of the prunable tensors at an overall sparsity.
DENSITY_ALLOCATIONS = {"uniform": _uniform_sparsities, "erk": _erk_sparsities}
SCOPES = {"layer": _layer_unstructured, "global": _global_unstructured}


def unstructured_masks(scores, names, sparsity, options: UnstructuredOptions):
    del names
    return SCOPES[options.scope](scores, sparsity, options.density)


@dataclasses.dataclass(frozen=True)
class NMOptions(PruningOptions):
    """Options of the "nm" pattern: keep `n` of every `m` consecutive entries along `axis` (for
    a Flax kernel [d_in, d_out], axis 0 is the reduction axis sparse tensor cores need)."""

    n: int = 2
    m: int = 4
    axis: int = 0

    def __post_init__(self) -> None:
        require(isinstance(self.n, int) and self.n >= 1, "n", self.n, "an int >= 1")
        require(isinstance(self.m, int) and self.m >= self.n, "m", self.m, f">= n={self.n}")


def nm_masks(scores, names, sparsity, options: NMOptions):
    del names, sparsity  # the pattern fixes the sparsity at 1 - n/m
    return [nm_mask(s, options.n, options.m, options.axis) for s in scores]


@dataclasses.dataclass(frozen=True)
class BlockOptions(PruningOptions):
    """Options of the "block" pattern: tiles of `rows x cols` of the last two dims."""

    rows: int = 4
    cols: int = 4

    def __post_init__(self) -> None:
        for name in ("rows", "cols"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, value, "an int >= 1")


def block_masks(scores, names, sparsity, options: BlockOptions):
    del names
    return [block_mask(s, sparsity, (options.rows, options.cols)) for s in scores]


@dataclasses.dataclass(frozen=True)
class NeuronOptions(PruningOptions):
    """Options of the "neuron" pattern: whole slices along `axis` (-1: the output neurons of a
    dense kernel, the output channels of a conv kernel)."""

    axis: int = -1


def neuron_masks(scores, names, sparsity, options: NeuronOptions):
    del names
    return [slice_mask(s, sparsity, options.axis) for s in scores]


def grouped_expert_masks(scores, names, sparsity, options: PruningOptions):
    """Whole experts: axis 0 of the sibling leaves under one parent path, pruned together, each
    expert scored by the sum of its scores over every sibling leaf."""
    del options
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name.rpartition("/")[0], []).append(i)
    out: list[jax.Array | None] = [None] * len(scores)
    for members in groups.values():
        expert_scores = sum(scores[i].reshape(scores[i].shape[0], -1).sum(axis=1) for i in members)
        kept = expert_masks({str(i): scores[i] for i in members}, sparsity, expert_scores)
        for i in members:
            out[i] = kept[str(i)]
    return out


def whole_layer_masks(scores, names, sparsity, options: PruningOptions):
    del names, options
    return layer_masks(scores, sparsity)


for _spec in (
    PatternSpec("unstructured", unstructured_masks, UnstructuredOptions),
    PatternSpec("nm", nm_masks, NMOptions),
    PatternSpec("block", block_masks, BlockOptions),
    PatternSpec("neuron", neuron_masks, NeuronOptions),
    PatternSpec("expert", grouped_expert_masks),
    PatternSpec("layer", whole_layer_masks),
):
    register(_spec)
