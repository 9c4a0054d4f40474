"""Multi-query associative recall (MQAR), generated on the fly.

Zoology: Measuring and Improving Recall in Efficient Language Models (Arora et al., 2023).

A sequence opens with `num_pairs` key-value pairs `k_1 v_1 ... k_P v_P` (distinct keys), then
the keys come back as queries, in random order, at random positions of the rest of the sequence
(filled with noise tokens). At each query position the model must predict that key's value.
Keys, values and noise use disjoint token ranges, so the answer cannot be guessed from a token's
range alone.

`layout="spread"` scatters the pairs over the first half of the sequence and asks the queries in
the second half, so the pairs sit in many different blocks: with the pairs packed at the front
(`layout="front"`, Zoology's layout) one block holds them all and block routing is trivial.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class MQARConfig:
    """Task shape: `length` tokens with `num_pairs` pairs over `num_keys` keys and `num_values`
    values; `num_noise` noise tokens fill the gaps."""

    length: int = 512
    num_pairs: int = 16
    num_keys: int = 64
    num_values: int = 64
    num_noise: int = 16
    layout: str = "front"

    def __post_init__(self):
        if self.layout not in ("front", "spread"):
            raise ValueError(f"layout={self.layout!r}: allowed are 'front', 'spread'")
        if self.num_pairs > self.num_keys:
            raise ValueError(f"num_pairs={self.num_pairs} exceeds num_keys={self.num_keys}")
        if 4 * self.num_pairs > self.length:
            raise ValueError(
                f"length={self.length} must be >= 4 * num_pairs={4 * self.num_pairs} "
                "(room for the pairs and one query per key in either layout)"
            )

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values + self.num_noise


def mqar_batch(config: MQARConfig, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One batch.

    Returns:
      inputs [batch, length] int32 tokens; targets [batch, length] int32 (the value at query
      positions, 0 elsewhere); loss_mask [batch, length] bool (True at query positions);
      pair_position [batch, length] int32: at a query position, the position of its key in the
      pair section (-1 elsewhere), for routing-recall diagnostics.
    """
    c = config
    rows = np.arange(batch)[:, None]

    def draw(candidates: np.ndarray) -> np.ndarray:
        """`num_pairs` distinct increasing picks from `candidates` per row: [batch, pairs]."""
        pick = np.argsort(rng.random((batch, candidates.size)), axis=1)[:, : c.num_pairs]
        return candidates[np.sort(pick, axis=1)]

    keys = np.argsort(rng.random((batch, c.num_keys)), axis=1)[:, : c.num_pairs]  # distinct
    values = c.num_keys + rng.integers(0, c.num_values, (batch, c.num_pairs))
    inputs = c.num_keys + c.num_values + rng.integers(0, c.num_noise, (batch, c.length))
    if c.layout == "front":
        pair_at = np.broadcast_to(np.arange(0, 2 * c.num_pairs, 2), (batch, c.num_pairs))
        where = draw(np.arange(2 * c.num_pairs, c.length))  # query positions
    else:
        half = c.length // 2
        pair_at = draw(np.arange(0, half, 2))
        where = draw(np.arange(half, c.length))
    inputs[rows, pair_at] = keys
    inputs[rows, pair_at + 1] = values
    targets = np.zeros((batch, c.length), np.int64)
    loss_mask = np.zeros((batch, c.length), bool)
    pair_position = np.full((batch, c.length), -1, np.int64)
    order = np.argsort(rng.random((batch, c.num_pairs)), axis=1)  # which pair each query asks
    inputs[rows, where] = keys[rows, order]
    targets[rows, where] = values[rows, order]
    loss_mask[rows, where] = True
    pair_position[rows, where] = pair_at[rows, order]
    return {
        "inputs": inputs.astype(np.int32),
        "targets": targets.astype(np.int32),
        "loss_mask": loss_mask,
        "pair_position": pair_position.astype(np.int32),
    }
