"""Multi-head latent attention (MLA), the attention of DeepSeek-V2 and V3.

DeepSeek-AI, "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model"
(2024). Keys and values are rebuilt per head from one low-rank latent per token, `c = norm(x @
w_kv_a)` of width `kv_lora_rank`, so a decoding cache holds that latent (plus one rotary key
shared by all heads) instead of every head's keys and values. Each head's query and key have a
part without position (`qk_nope_head_dim`, from the latent) and a rotary part
(`qk_rope_head_dim`); queries may pass through their own low-rank bottleneck (`q_lora_rank`).

The rotary part uses the half-split layout of `moejax.rotary`; checkpoints that rotate
interleaved pairs are permuted on load (`moejax.pretrained`), which leaves every dot product
unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.attention import cached_attention, causal_attention, check_hidden, write_cache
from moejax.errors import require_config
from moejax.norms import rms_norm
from moejax.parallel.sharding import constrain, param
from moejax.rotary import RopeScaling, apply_rotary, rotary_angles, rotary_frequencies, yarn_mscale


@dataclasses.dataclass(frozen=True)
class LatentAttentionConfig:
    """`model.latent_attention`: multi-head latent attention replaces grouped-query attention
    when `kv_lora_rank > 0` (then `model.head_dim` and `model.num_kv_heads` are unused)."""

    # Width of the key/value latent cached per token; 0: grouped-query attention instead.
    kv_lora_rank: int = 0
    # Width of the query bottleneck; 0: queries project straight from the residual stream.
    q_lora_rank: int = 0
    # Per-head widths: the query/key part without position, the rotary part, the values.
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self) -> None:
        require_config(
            self.kv_lora_rank >= 0 and self.q_lora_rank >= 0,
            "model.latent_attention.kv_lora_rank",
            self.kv_lora_rank,
            ">= 0 (0: grouped-query attention), with q_lora_rank >= 0",
        )
        if self.kv_lora_rank:
            for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                value = getattr(self, name)
                require_config(
                    value > 0,
                    f"model.latent_attention.{name}",
                    value,
                    "> 0 when kv_lora_rank is set",
                )
            require_config(
                self.qk_rope_head_dim % 2 == 0,
                "model.latent_attention.qk_rope_head_dim",
                self.qk_rope_head_dim,
                "an even number (rotary embeddings rotate pairs)",
            )

    @property
    def enabled(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LatentCache:
    """Latent attention's decoding cache: `latent [batch, max_len, kv_lora_rank]` (normed) and
    `rope_key [batch, max_len, qk_rope_head_dim]` (rotated), slot p holding position p."""

    latent: jax.Array
    rope_key: jax.Array


def _init(key: jax.Array, shape: tuple[int, ...], dtype, fan_in: int) -> jax.Array:
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, dtype) * fan_in**-0.5


class LatentAttention(nnx.Module):
    """Causal multi-head latent attention with rotary positions; the same interface as
    `moejax.attention.Attention` (`__call__`, `init_cache`, `decode`)."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        latent: LatentAttentionConfig,
        rope_base: float = 10_000.0,
        *,
        rope_scaling: RopeScaling | None = None,
        max_position: int = 0,
        norm_eps: float = 1e-6,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        rope_scaling = RopeScaling() if rope_scaling is None else rope_scaling
        self.d_model, self.num_heads, self.latent = d_model, num_heads, latent
        self.dtype, self.norm_eps = dtype, norm_eps
        rope_dim = latent.qk_rope_head_dim
        inv_freq, self.rope_attention_factor = rotary_frequencies(
            rope_dim, rope_base, rope_scaling, max_position
        )
        self.inv_freq = tuple(float(f) for f in inv_freq)
        self.rope_base = rope_base
        self.softmax_scale = latent.qk_head_dim**-0.5
        if rope_scaling.mscale_all_dim:
            # DeepSeek's YaRN also sharpens the whole softmax, not only the rotary part (a
            # factor of 1 leaves it: yarn_mscale(1, .) = 1).
            self.softmax_scale *= yarn_mscale(rope_scaling.factor, rope_scaling.mscale_all_dim) ** 2
        heads, qk, kv_rank = num_heads, latent.qk_head_dim, latent.kv_lora_rank
        if latent.q_lora_rank:
            q_rank = latent.q_lora_rank
            self.w_q_a = param(
                _init(rngs.params(), (d_model, q_rank), param_dtype, d_model), ("embed", None)
            )
            self.q_a_norm = param(jnp.ones((q_rank,), param_dtype), (None,))
            self.w_q_b = param(
                _init(rngs.params(), (q_rank, heads, qk), param_dtype, q_rank),
                (None, "heads", "head_dim"),
            )
        else:
            self.w_q = param(
                _init(rngs.params(), (d_model, heads, qk), param_dtype, d_model),
                ("embed", "heads", "head_dim"),
            )
        self.w_kv_a = param(
            _init(rngs.params(), (d_model, kv_rank + rope_dim), param_dtype, d_model),
            ("embed", None),
        )
        self.kv_a_norm = param(jnp.ones((kv_rank,), param_dtype), (None,))
        self.w_kv_b = param(
            _init(
                rngs.params(),
                (kv_rank, heads, latent.qk_nope_head_dim + latent.v_head_dim),
                param_dtype,
                kv_rank,
            ),
            (None, "heads", "head_dim"),
        )
        v_dim = latent.v_head_dim
        self.w_o = param(
            _init(rngs.params(), (heads, v_dim, d_model), param_dtype, heads * v_dim),
            ("heads", "head_dim", "embed"),
        )

    def _weight(self, name: str) -> jax.Array:
        return getattr(self, name)[...].astype(self.dtype)

    def _queries(self, x: jax.Array, angles: jax.Array) -> jax.Array:
        """`[batch, length, heads, qk_head_dim]`: the position-free part, then the rotated."""
        if self.latent.q_lora_rank:
            q_latent = jnp.einsum("bld,dr->blr", x, self._weight("w_q_a"))
            q_latent = rms_norm(q_latent, self.q_a_norm[...], self.norm_eps)
            q = jnp.einsum("blr,rhk->blhk", q_latent, self._weight("w_q_b"))
        else:
            q = jnp.einsum("bld,dhk->blhk", x, self._weight("w_q"))
        q = constrain(q, ("batch", "length", "activation_heads", "head_dim"))
        nope, rope = jnp.split(q, [self.latent.qk_nope_head_dim], axis=-1)
        rope = apply_rotary(rope, angles, self.rope_attention_factor)
        return jnp.concatenate([nope, rope], axis=-1)

    def _latents(self, x: jax.Array, angles: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(normed latent `[batch, length, kv_lora_rank]`, rotated shared key `[batch, length,
        qk_rope_head_dim]`)."""
        compressed = jnp.einsum("bld,dr->blr", x, self._weight("w_kv_a"))
        latent, rope_key = jnp.split(compressed, [self.latent.kv_lora_rank], axis=-1)
        latent = rms_norm(latent, self.kv_a_norm[...], self.norm_eps)
        rope_key = apply_rotary(rope_key[:, :, None, :], angles, self.rope_attention_factor)
        return latent, rope_key[:, :, 0, :]

    def _keys_values(self, latent: jax.Array, rope_key: jax.Array):
        """Per-head keys `[batch, n, heads, qk_head_dim]` and values `[batch, n, heads,
        v_head_dim]` rebuilt from the latents."""
        kv = jnp.einsum("blr,rhk->blhk", latent, self._weight("w_kv_b"))
        k_nope, v = jnp.split(kv, [self.latent.qk_nope_head_dim], axis=-1)
        rope = jnp.broadcast_to(rope_key[:, :, None, :], (*k_nope.shape[:3], rope_key.shape[-1]))
        return jnp.concatenate([k_nope, rope.astype(k_nope.dtype)], axis=-1), v

    def _angles(self, positions: jax.Array) -> jax.Array:
        return rotary_angles(positions, self.latent.qk_rope_head_dim, self.rope_base, self.inv_freq)

    def __call__(
        self, x: jax.Array, positions: jax.Array | None = None, *, return_probs: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """`x [batch, length, d_model]` -> `[batch, length, d_model]` (and the head-averaged
        weights `[batch, length, length]` with `return_probs`)."""
        check_hidden("LatentAttention", x, self.d_model)
        x = x.astype(self.dtype)
        angles = self._angles(jnp.arange(x.shape[1]) if positions is None else positions)
        q = self._queries(x, angles)
        k, v = self._keys_values(*self._latents(x, angles))
        out = causal_attention(q, k, v, return_probs=return_probs, scale=self.softmax_scale)
        probs = None
        if return_probs:
            out, probs = out
        y = jnp.einsum("blhk,hkd->bld", out, self._weight("w_o"))
        return (y, probs) if return_probs else y

    def init_cache(self, batch: int, max_len: int, dtype=None) -> LatentCache:
        dtype = self.dtype if dtype is None else dtype
        return LatentCache(
            jnp.zeros((batch, max_len, self.latent.kv_lora_rank), dtype),
            jnp.zeros((batch, max_len, self.latent.qk_rope_head_dim), dtype),
        )

    def decode(
        self, x: jax.Array, positions: jax.Array, cache: LatentCache
    ) -> tuple[jax.Array, LatentCache]:
        """`x [batch, n, d_model]` at `positions [batch, n]` -> (output, the cache with their
        latents written); keys and values are rebuilt from every cached latent."""
        check_hidden("LatentAttention", x, self.d_model)
        x = x.astype(self.dtype)
        angles = self._angles(positions)
        q = self._queries(x, angles)
        latent, rope_key = self._latents(x, angles)
        cache = LatentCache(
            write_cache(cache.latent, latent, positions),
            write_cache(cache.rope_key, rope_key, positions),
        )
        k, v = self._keys_values(cache.latent.astype(x.dtype), cache.rope_key.astype(x.dtype))
        out = cached_attention(q, k, v, positions, scale=self.softmax_scale)
        return jnp.einsum("blhk,hkd->bld", out, self._weight("w_o")), cache
