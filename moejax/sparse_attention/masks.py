"""Static block-sparse attention patterns built at block granularity.

A `BlockPattern` is a boolean `[q_blocks, kv_blocks]` numpy array plus the two element-level
flags of `kernels_pallas.block_sparse_attention` (`causal`, `window`). The element mask it
stands for is

    visible(q, k) = block_mask[q // block_q, k // block_kv]
                    and (not causal or k <= q) and (window is None or q - window < k <= q)

so nothing of size `[length, length]` is ever built (except by `element_mask`, for tests).
Patterns compose with `&` and `|`; `|` needs equal element flags, because the union of two
differently flagged patterns is not expressible with one set of flags.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def check_blocks(length: int, block_q: int, block_kv: int) -> tuple[int, int]:
    """`(q_blocks, kv_blocks)` for a self-attention of `length` tokens; lengths that the block
    sizes do not divide are rejected (pad the sequence to a multiple of the block size)."""
    for name, block in (("block_q", block_q), ("block_kv", block_kv)):
        if block < 1:
            raise ValueError(f"{name}={block}: must be >= 1")
        if length % block:
            raise ValueError(
                f"length={length} is not divisible by {name}={block}: sequences are not padded "
                "here, pad them to a multiple of the block size"
            )
    return length // block_q, length // block_kv


def _block_ranges(num_blocks: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last token position of every block, `[num_blocks]` each."""
    start = np.arange(num_blocks, dtype=np.int64) * block
    return start, start + block - 1


@dataclasses.dataclass(frozen=True)
class BlockPattern:
    """A block mask `[q_blocks, kv_blocks]` with the element flags that refine partial blocks."""

    block_mask: np.ndarray
    block_q: int
    block_kv: int
    causal: bool = False
    window: int | None = None

    def __post_init__(self):
        if self.block_mask.ndim != 2 or self.block_mask.dtype != np.bool_:
            raise ValueError(
                f"block_mask: shape {self.block_mask.shape} dtype {self.block_mask.dtype}; "
                "expected a 2-d bool array [q_blocks, kv_blocks]"
            )
        if self.window is not None and self.window < 1:
            raise ValueError(f"window={self.window}: must be >= 1 or None")

    def _check_compatible(self, other: BlockPattern) -> None:
        mine = (self.block_mask.shape, self.block_q, self.block_kv)
        theirs = (other.block_mask.shape, other.block_q, other.block_kv)
        if mine != theirs:
            raise ValueError(f"patterns differ in (shape, block_q, block_kv): {mine} vs {theirs}")

    def __and__(self, other: BlockPattern) -> BlockPattern:
        self._check_compatible(other)
        windows = [w for w in (self.window, other.window) if w is not None]
        return BlockPattern(
            self.block_mask & other.block_mask,
            self.block_q,
            self.block_kv,
            causal=self.causal or other.causal,
            window=min(windows) if windows else None,
        )

    def __or__(self, other: BlockPattern) -> BlockPattern:
        self._check_compatible(other)
        if (self.causal, self.window) != (other.causal, other.window):
            raise ValueError(
                f"cannot take the union of patterns with element flags (causal, window) = "
                f"{(self.causal, self.window)} and {(other.causal, other.window)}: build the "
                "windowed one with exact=False (block-granular window) so the flags agree"
            )
        return dataclasses.replace(self, block_mask=self.block_mask | other.block_mask)

    @property
    def max_kv_blocks(self) -> int:
        """The most kv blocks any query block visits (the kernel's static gather bound)."""
        return max(int(self.block_mask.sum(axis=1).max(initial=0)), 1)

    def density(self) -> float:
        """Share of causal `(q_block, kv_block)` pairs that are visited."""
        causal = causal_blocks(*self.block_mask.shape, self.block_q, self.block_kv)
        return float((self.block_mask & causal).sum() / causal.sum())

    def element_mask(self) -> np.ndarray:
        """The `[q_len, kv_len]` bool mask this pattern stands for (quadratic: tests only)."""
        dense = np.repeat(np.repeat(self.block_mask, self.block_q, 0), self.block_kv, 1)
        q = np.arange(dense.shape[0])[:, None]
        k = np.arange(dense.shape[1])[None, :]
        if self.causal:
            dense &= k <= q
        if self.window is not None:
            dense &= (k <= q) & (k > q - self.window)
        return dense


def causal_blocks(q_blocks: int, kv_blocks: int, block_q: int, block_kv: int) -> np.ndarray:
    """`[q_blocks, kv_blocks]` bool: the block holds at least one pair with `k <= q`."""
    q_start, q_end = _block_ranges(q_blocks, block_q)
    k_start, _ = _block_ranges(kv_blocks, block_kv)
    return k_start[None, :] <= q_end[:, None]


def causal(length: int, block_q: int, block_kv: int) -> BlockPattern:
    """Dense causal attention: every block on or below the diagonal, element causality inside."""
    nq, nk = check_blocks(length, block_q, block_kv)
    return BlockPattern(causal_blocks(nq, nk, block_q, block_kv), block_q, block_kv, causal=True)


def sliding_window(
    length: int, block_q: int, block_kv: int, window: int, *, exact: bool = True
) -> BlockPattern:
    """Each query sees the `window` most recent keys, itself included (`q - window < k <= q`).

    `exact=True` cuts partial blocks with the element `window` flag; `exact=False` keeps whole
    blocks (every key of a block that overlaps the window), which composes with `|`.
    """
    if window < 1:
        raise ValueError(f"window={window}: must be >= 1")
    nq, nk = check_blocks(length, block_q, block_kv)
    q_start, q_end = _block_ranges(nq, block_q)
    k_start, k_end = _block_ranges(nk, block_kv)
    # Offsets q - k inside block pair (i, j) span [q_start - k_end, q_end - k_start]; the pair
    # is visited when that span meets [0, window - 1].
    lowest = q_start[:, None] - k_end[None, :]
    highest = q_end[:, None] - k_start[None, :]
    mask = (highest >= 0) & (lowest <= window - 1)
    return BlockPattern(mask, block_q, block_kv, causal=True, window=window if exact else None)


def global_tokens(length: int, block_q: int, block_kv: int, num_global: int) -> BlockPattern:
    """The first `num_global` tokens are global: every query sees them and they see every
    (earlier) key. Causal. Granularity is the block: the whole blocks holding global tokens
    are global, so the pattern is exact when `num_global` is a multiple of the block sizes."""
    if num_global < 0:
        raise ValueError(f"num_global={num_global}: must be >= 0")
    nq, nk = check_blocks(length, block_q, block_kv)
    q_start, _ = _block_ranges(nq, block_q)
    k_start, _ = _block_ranges(nk, block_kv)
    mask = (k_start[None, :] < num_global) | (q_start[:, None] < num_global)
    return BlockPattern(mask, block_q, block_kv, causal=True) & causal(length, block_q, block_kv)


def global_local(
    length: int, block_q: int, block_kv: int, window: int, num_global: int
) -> BlockPattern:
    """Global tokens plus a block-granular sliding window (Longformer / BigBird style)."""
    local = sliding_window(length, block_q, block_kv, window, exact=False)
    return local | global_tokens(length, block_q, block_kv, num_global)


def random_blocks(length: int, block: int, num_random: int, *, seed: int) -> BlockPattern:
    """Each query block visits `num_random` kv blocks drawn uniformly from its strictly earlier
    blocks (all of them when there are fewer). Causal."""
    if num_random < 0:
        raise ValueError(f"num_random={num_random}: must be >= 0")
    nq, nk = check_blocks(length, block, block)
    rng = np.random.default_rng(seed)
    mask = np.zeros((nq, nk), bool)
    for i in range(nq):
        chosen = rng.permutation(i)[:num_random]
        mask[i, chosen] = True
    return BlockPattern(mask, block, block, causal=True)


def dilated(length: int, block: int, dilation: int, num_blocks: int) -> BlockPattern:
    """Query block `i` visits kv blocks `i, i - dilation, ..., i - (num_blocks - 1) * dilation`:
    a strided window whose reach grows with `dilation` at a fixed cost. Causal."""
    if dilation < 1 or num_blocks < 1:
        raise ValueError(f"dilation={dilation}, num_blocks={num_blocks}: both must be >= 1")
    nq, nk = check_blocks(length, block, block)
    offset = np.arange(nq)[:, None] - np.arange(nk)[None, :]  # [nq, nk], in blocks
    mask = (offset >= 0) & (offset % dilation == 0) & (offset < num_blocks * dilation)
    return BlockPattern(mask, block, block, causal=True)
