"""How a Hugging Face checkpoint's tensors become moejax arrays and back: `Tensor` entries, one
per moejax array, and the conversions every architecture shares.

Hugging Face stores a linear layer as `weight [out, in]` (PyTorch's `y = x @ W.T`); moejax
stores the contraction's input first and splits heads and experts into their own axes
(`w_q [d_model, heads, head_dim]`, `w_gate [experts, d_model, d_ff]`). Each `Tensor` knows the
checkpoint names it reads, how to build the moejax array from them (`load`) and how to split it
back (`save`), so loading and export share one table per architecture and cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One moejax array and the checkpoint tensors it is made of.

    Attributes:
      path: keys into the model's pure state dict (`("blocks", 0, "attention", "w_q")`).
      names: the checkpoint tensor names, in the order `load` takes them.
      load: `(arrays, shape) -> array`: the checkpoint tensors -> the moejax array of `shape`.
      save: `array -> arrays`: the inverse, in `names` order.
      collection: "params", or "router_state" for state kept outside the gradient.
    """

    path: Path
    names: tuple[str, ...]
    load: Callable[[Sequence[np.ndarray], tuple[int, ...]], np.ndarray]
    save: Callable[[np.ndarray], list[np.ndarray]]
    collection: str = "params"


def copy(path: Path, name: str, collection: str = "params") -> Tensor:
    """The same array under another name (embeddings, norm scales), reshaped to moejax's."""
    return Tensor(
        path,
        (name,),
        lambda arrays, shape: arrays[0].reshape(shape),
        lambda array: [array.reshape(-1) if array.ndim > 1 else array],
        collection,
    )


def copy_2d(path: Path, name: str) -> Tensor:
    """A matrix stored the same way in both (the token embedding `[vocab, d_model]`)."""
    return Tensor(path, (name,), lambda arrays, shape: arrays[0], lambda array: [array])


def linear(path: Path, name: str, out_axes: int = 1) -> Tensor:
    """A linear layer `weight [out, in]` -> moejax's `[in..., out...]` (`w_q [d_model, heads,
    head_dim]`, `w_o [heads, head_dim, d_model]`); `out_axes` trailing axes of the moejax
    array are the output features."""

    def save(array: np.ndarray) -> list[np.ndarray]:
        split = array.ndim - out_axes
        inputs = int(np.prod(array.shape[:split]))
        return [array.reshape(inputs, -1).T]

    return Tensor(path, (name,), lambda arrays, shape: arrays[0].T.reshape(shape), save)


def row_vector(path: Path, name: str) -> Tensor:
    """A linear layer with one output, `weight [1, in]` -> `[in]` (a gate's weights)."""
    return Tensor(
        path, (name,), lambda arrays, shape: arrays[0].reshape(shape), lambda a: [a.reshape(1, -1)]
    )


def bias(path: Path, name: str) -> Tensor:
    """A bias `[out]` -> moejax's `[heads, head_dim]` (or `[d_model]`)."""
    return copy(path, name)


def stacked_linear(path: Path, names: Sequence[str]) -> Tensor:
    """One linear layer per expert, `weight [out, in]` each -> `[experts, in, out]`."""
    return Tensor(
        path,
        tuple(names),
        lambda arrays, shape: np.stack([a.T for a in arrays]).reshape(shape),
        lambda array: [expert.T for expert in array],
    )


def fused_linear(path: Path, name: str) -> Tensor:
    """Experts stored as one tensor `[experts, out, in]` -> `[experts, in, out]`."""
    return Tensor(
        path,
        (name,),
        lambda arrays, shape: np.swapaxes(arrays[0], 1, 2).reshape(shape),
        lambda array: [np.swapaxes(array, 1, 2)],
    )


def permuted_rows(tensor: Tensor, rows: np.ndarray) -> Tensor:
    """`tensor` whose checkpoint weight has its output features (rows) in another order:
    moejax's row i is the checkpoint's row `rows[i]`."""
    inverse = np.argsort(rows)

    def load(arrays, shape):
        return tensor.load([arrays[0][rows]], shape)

    def save(array):
        return [tensor.save(array)[0][inverse]]

    return Tensor(tensor.path, tensor.names, load, save, tensor.collection)


def deinterleave(width: int) -> np.ndarray:
    """Order `[0, 2, 4, ..., 1, 3, 5, ...]` of `width` features: rotary pairs stored side by
    side `(x0, x1), (x2, x3), ...` become moejax's halves `(x0, x2, ...), (x1, x3, ...)`."""
    return np.concatenate([np.arange(0, width, 2), np.arange(1, width, 2)])


def swiglu_mlp(path: Path, prefix: str) -> list[Tensor]:
    """A dense SwiGLU MLP, `{prefix}.gate_proj/up_proj/down_proj.weight`."""
    return [
        linear((*path, "w_gate"), f"{prefix}.gate_proj.weight"),
        linear((*path, "w_up"), f"{prefix}.up_proj.weight"),
        linear((*path, "w_down"), f"{prefix}.down_proj.weight"),
    ]


def shared_expert(path: Path, prefix: str) -> list[Tensor]:
    """A checkpoint's one shared SwiGLU MLP -> moejax's shared experts `[1, ...]`."""

    def one(name: str, ours: str) -> Tensor:
        return Tensor(
            (*path, ours),
            (f"{prefix}.{name}.weight",),
            lambda arrays, shape: arrays[0].T.reshape(shape),
            lambda array: [array[0].T],
        )

    return [
        one("gate_proj", "shared_w_gate"),
        one("up_proj", "shared_w_up"),
        one("down_proj", "shared_w_down"),
    ]


def experts(path: Path, prefix: str, num_experts: int, names: tuple[str, str, str]) -> list[Tensor]:
    """Routed experts stored one by one, `{prefix}.{e}.{name}.weight` for the gate, up and down
    projections named by `names` (Mixtral's `w1, w3, w2`, others' `gate_proj, up_proj,
    down_proj`)."""
    ours = ("w_gate", "w_up", "w_down")
    return [
        stacked_linear((*path, mine), [f"{prefix}.{e}.{theirs}.weight" for e in range(num_experts)])
        for mine, theirs in zip(ours, names, strict=True)
    ]
