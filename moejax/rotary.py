"""Rotary position embeddings and the ways pretrained models stretch them past their context.

RoFormer (Su et al., 2021) rotates each pair of features `(x[i], x[i + d/2])` of a query or key
by `position * inv_freq[i]`. Long-context models change `inv_freq` (and YaRN the size of the
rotated vectors) after pretraining; `RopeScaling` names each such variant with the fields of a
Hugging Face `rope_scaling` block, and `rotary_frequencies` computes it:

- "linear" (position interpolation, Chen et al. 2023): every frequency divided by `factor`.
- "llama3": low frequencies divided by `factor`, high ones kept, a smooth ramp between
  (wavelengths measured against `original_max_position`).
- "yarn" (Peng et al. 2023): the same idea with a ramp over rotation counts (`beta_fast`,
  `beta_slow`), plus an attention temperature `attention_factor` that scales the rotated
  vectors (`0.1 * mscale * ln(factor) + 1`, or a ratio of two such terms).

Frequencies are computed in float32 numpy, as the reference implementations do in float32, so
pretrained checkpoints see the angles they were trained with.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from moejax.errors import require_config, require_one_of


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How the rotary frequencies are stretched (`model.rope_scaling`); "none" keeps them."""

    # "none", "linear", "llama3" or "yarn" (see the module docstring).
    kind: str = "none"
    # How much longer the context becomes (all kinds but "none").
    factor: float = 1.0
    # The context length of pretraining (llama3, yarn); 0: model.max_seq_len.
    original_max_position: int = 0
    # llama3: wavelengths above original_max_position / low_freq_factor are divided by factor,
    # those below original_max_position / high_freq_factor are kept.
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn: the rotation counts between which frequencies ramp from kept to interpolated.
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    # yarn: the temperature's mscale terms (0 for mscale_all_dim: not used).
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    # yarn: the attention factor itself; 0 derives it from mscale and mscale_all_dim.
    attention_factor: float = 0.0
    # yarn: round the ramp's ends to whole dimensions (the reference's default).
    truncate: bool = True

    def __post_init__(self) -> None:
        require_one_of("model.rope_scaling.kind", self.kind, list(SCALINGS))
        require_config(
            self.factor >= 1.0, "model.rope_scaling.factor", self.factor, ">= 1 (1: no stretch)"
        )
        require_config(
            self.high_freq_factor > self.low_freq_factor,
            "model.rope_scaling.high_freq_factor",
            self.high_freq_factor,
            f"> low_freq_factor={self.low_freq_factor}",
        )
        require_config(
            self.original_max_position >= 0,
            "model.rope_scaling.original_max_position",
            self.original_max_position,
            ">= 0 (0: model.max_seq_len)",
        )


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term `0.1 * mscale * ln(factor) + 1` (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rotary_frequencies(
    head_dim: int, base: float, scaling: RopeScaling | None = None, max_position: int = 0
) -> tuple[np.ndarray, float]:
    """`(inv_freq [head_dim // 2] float32, attention_factor)` of rotary embeddings of width
    `head_dim` with frequency base `base`, stretched by `scaling`; `max_position` stands in for
    a zero `scaling.original_max_position`. The attention factor multiplies the cosines and
    sines (1 except for YaRN)."""
    scaling = RopeScaling() if scaling is None else scaling
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / np.float32(base) ** exponents).astype(np.float32)
    original = scaling.original_max_position or max_position
    compute, needs_original = SCALINGS[scaling.kind]
    if needs_original:
        require_config(
            original > 0,
            "model.rope_scaling.original_max_position",
            scaling.original_max_position,
            f"> 0 with kind={scaling.kind!r} (or model.max_seq_len set)",
        )
    return compute(inv_freq, head_dim, base, scaling, original)


def _unscaled(inv_freq, head_dim, base, scaling, original):
    return inv_freq, 1.0


def _linear(inv_freq, head_dim, base, scaling, original):
    return (inv_freq / np.float32(scaling.factor)).astype(np.float32), 1.0


def _llama3(inv_freq, head_dim, base, scaling, original):
    factor = np.float32(scaling.factor)
    wavelength = 2 * np.pi / inv_freq
    low_freq_wavelength = original / scaling.low_freq_factor
    high_freq_wavelength = original / scaling.high_freq_factor
    scaled = np.where(wavelength > low_freq_wavelength, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return np.where(medium, smoothed, scaled).astype(np.float32), 1.0


def _yarn(inv_freq, head_dim, base, scaling, original):
    factor = scaling.factor
    if scaling.attention_factor:
        attention_factor = scaling.attention_factor
    elif scaling.mscale and scaling.mscale_all_dim:
        attention_factor = yarn_mscale(factor, scaling.mscale) / yarn_mscale(
            factor, scaling.mscale_all_dim
        )
    else:
        attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength fits `rotations` times into the original context.
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation_share = (1 - ramp).astype(np.float32)
    powers = np.float32(base) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    extrapolated = 1.0 / powers
    interpolated = 1.0 / (np.float32(factor) * powers)
    inv_freq = interpolated * (1 - extrapolation_share) + extrapolated * extrapolation_share
    return inv_freq.astype(np.float32), float(attention_factor)


# Each kind: `(inv_freq, head_dim, base, scaling, original context) -> (inv_freq,
# attention factor)`, and whether it reads the original context length.
SCALINGS = {
    "none": (_unscaled, False),
    "linear": (_linear, False),
    "llama3": (_llama3, True),
    "yarn": (_yarn, True),
}


def rotary_angles(
    positions: jax.Array,
    head_dim: int,
    base: float,
    inv_freq: np.ndarray | jax.Array | None = None,
) -> jax.Array:
    """Rotation angles `[..., head_dim // 2]` for integer `positions [...]` (`[length]` or
    `[batch, length]`): `position * inv_freq`, the plain RoFormer frequencies of `base` unless
    `inv_freq [head_dim // 2]` is given (`rotary_frequencies`)."""
    if inv_freq is None:
        inv_freq = rotary_frequencies(head_dim, base)[0]
    return positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)


def apply_rotary(x: jax.Array, angles: jax.Array, scale: float = 1.0) -> jax.Array:
    """Rotates feature pairs (first half, second half) of `x [batch, length, heads, head_dim]`.

    `angles` is `[length, head_dim // 2]` (shared by the batch) or `[batch, length, head_dim //
    2]`; `scale` multiplies the result (YaRN's attention factor).
    """
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    if angles.ndim == 2:
        angles = angles[None]
    cos = jnp.cos(angles)[:, :, None, :] * scale  # [batch or 1, length, 1, head_dim/2]
    sin = jnp.sin(angles)[:, :, None, :] * scale
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
