"""Causal multi-head attention with rotary positions and grouped-query heads.

The math lives in `apply_rotary` and `causal_attention`; `Attention` owns the projections.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.errors import require, require_one_of
from moejax.norms import rms_norm
from moejax.parallel.sharding import constrain, param
from moejax.rotary import RopeScaling, apply_rotary, rotary_angles, rotary_frequencies

# How queries and keys are normalised before the rotary embedding, as the trailing axes of
# `[batch, length, heads, head_dim]` the RMS is taken over (and the norm's scale spans): not at
# all, per head over head_dim (Qwen3), or across all heads at once (OLMoE normalises the whole
# projection).
QK_NORMS: dict[str, tuple[int, ...]] = {"none": (), "per_head": (-1,), "across_heads": (-2, -1)}


def check_hidden(layer: str, x: jax.Array, d_model: int) -> None:
    """ValueError naming `layer`, the shape of `x` and the one expected, `[batch, length,
    d_model]`: the check at a layer's boundary, before a reshape or einsum fails obscurely."""
    require(
        getattr(x, "ndim", None) == 3 and x.shape[-1] == d_model,
        f"{layer}: x.shape",
        getattr(x, "shape", type(x).__name__),
        f"[batch, length, d_model={d_model}]",
    )


def head_shape(
    d_model: int, num_heads: int, num_kv_heads: int | None, head_dim: int | None, layer: str
) -> tuple[int, int]:
    """`(num_kv_heads, head_dim)` with their defaults (`num_heads`, `d_model // num_heads`)
    filled in and checked: ValueError naming the argument."""
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    head_dim = d_model // num_heads if head_dim is None else head_dim
    require(
        num_kv_heads > 0 and num_heads % num_kv_heads == 0,
        f"{layer} num_kv_heads",
        num_kv_heads,
        f"a divisor of num_heads={num_heads}",
    )
    require(
        head_dim > 0 and head_dim % 2 == 0,
        f"{layer} head_dim",
        head_dim,
        "an even number > 0 (rotary embeddings rotate pairs of features; the default is "
        f"d_model // num_heads = {d_model // num_heads})",
    )
    return num_kv_heads, head_dim


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    return_probs: bool = False,
    scale: float | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Causal softmax attention.

    Args:
      q: `[batch, length, heads, head_dim]`.
      k, v: `[batch, length, kv_heads, head_dim]`, `heads % kv_heads == 0` (grouped-query).
      return_probs: also return the attention weights averaged over heads.
      scale: the logits' factor, head_dim ** -0.5 by default.

    Returns:
      `[batch, length, heads, v_head_dim]`; logits and softmax in float32. With `return_probs`,
      also `[batch, length, length]` float32 weights (rows sum to 1), the attention graph that
      the attention-aware router reads.
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32)
    logits = logits * (head_dim**-0.5 if scale is None else scale)
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)  # [b, kv_heads, group, q, k]
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v)
    out = out.reshape(batch, length, heads, v.shape[-1])
    if return_probs:
        return out, jnp.mean(probs, axis=(1, 2))
    return out


def init_projections(
    rngs: nnx.Rngs,
    d_model: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    param_dtype: jnp.dtype,
    *,
    with_keys: bool = True,
) -> dict[str, nnx.Param]:
    """The projections of grouped-query attention, drawn in the order q, k, v, o.

    Returns `w_q [d_model, heads, head_dim]`, `w_k` and `w_v [d_model, kv_heads, head_dim]`
    (no `w_k` with `with_keys=False`, for layers whose keys are their queries) and
    `w_o [heads, head_dim, d_model]`, fan-in scaled, with their logical axis names.
    """
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    kv_axes = ("embed", "kv_heads", "head_dim")
    projections = {
        "w_q": param(
            init(rngs.params(), (d_model, num_heads, head_dim), param_dtype),
            ("embed", "heads", "head_dim"),
        )
    }
    if with_keys:
        projections["w_k"] = param(
            init(rngs.params(), (d_model, num_kv_heads, head_dim), param_dtype), kv_axes
        )
    projections["w_v"] = param(
        init(rngs.params(), (d_model, num_kv_heads, head_dim), param_dtype), kv_axes
    )
    out_init = jax.nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2
    )
    projections["w_o"] = param(
        out_init(rngs.params(), (num_heads, head_dim, d_model), param_dtype),
        ("heads", "head_dim", "embed"),
    )
    return projections


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """What pretrained architectures vary in grouped-query attention; the defaults are
    moejax's own attention.

    Attributes:
      qkv_bias: biases on the query, key and value projections (Qwen2).
      out_bias: a bias on the output projection.
      qk_norm: one of `QK_NORMS`, RMSNorm of queries and keys before the rotary embedding.
      norm_eps: epsilon of those norms.
      rope_scaling: how the rotary frequencies are stretched (`moejax.rotary`).
      max_position: the context the rope scaling falls back on (the model's max_seq_len).
    """

    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: str = "none"
    norm_eps: float = 1e-6
    rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
    max_position: int = 0

    def __post_init__(self) -> None:
        require_one_of("AttentionOptions.qk_norm", self.qk_norm, list(QK_NORMS))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """One attention layer's keys and values of the positions decoded so far.

    `key [batch, max_len, kv_heads, head_dim]` and `value` (the same, `v_head_dim` last) hold
    position p of each sequence at slot p; slots past a sequence's current position are stale
    and masked. Latent attention keeps its compressed latents here instead (see
    `moejax.latent_attention`).
    """

    key: jax.Array
    value: jax.Array

    @staticmethod
    def zeros(batch: int, max_len: int, kv_heads: int, head_dim: int, v_head_dim: int, dtype):
        return KVCache(
            jnp.zeros((batch, max_len, kv_heads, head_dim), dtype),
            jnp.zeros((batch, max_len, kv_heads, v_head_dim), dtype),
        )


def write_cache(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """`cache [batch, max_len, ...]` with `new [batch, n, ...]` written at each sequence's
    `positions [batch, n]` (slots past max_len are dropped)."""
    batch_index = jnp.arange(cache.shape[0])[:, None]
    return cache.at[batch_index, positions].set(new.astype(cache.dtype), mode="drop")


def cached_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    *,
    scale: float | None = None,
) -> jax.Array:
    """Attention of queries at `q_positions [batch, n]` to the cached slots `k, v [batch,
    max_len, kv_heads, head_dim]`, slot j visible from position p when j <= p.

    `q [batch, n, heads, head_dim]`; `scale` defaults to head_dim ** -0.5. Returns `[batch, n,
    heads, v_head_dim]`, the softmax in float32.
    """
    batch, n, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    scale = head_dim**-0.5 if scale is None else scale
    q = q.reshape(batch, n, kv_heads, heads // kv_heads, head_dim)
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32) * scale
    visible = jnp.arange(k.shape[1])[None, None, :] <= q_positions[:, :, None]  # [b, q, k]
    logits = jnp.where(visible[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v)
    return out.reshape(batch, n, heads, v.shape[-1])


class Attention(nnx.Module):
    """Causal grouped-query self-attention with rotary positions.

    `num_kv_heads` defaults to `num_heads` (multi-head attention), `head_dim` to
    `d_model // num_heads`; `options` adds what pretrained architectures have (biases, q/k
    norms, rope scaling). `__call__` attends within the given sequence; `decode` attends to a
    `KVCache` and returns it updated.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        rope_base: float = 10_000.0,
        *,
        options: AttentionOptions | None = None,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        num_kv_heads, head_dim = head_shape(d_model, num_heads, num_kv_heads, head_dim, "Attention")
        options = AttentionOptions() if options is None else options
        self.d_model = d_model
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rope_base, self.dtype = rope_base, dtype
        self.norm_eps = options.norm_eps
        inv_freq, self.rope_attention_factor = rotary_frequencies(
            head_dim, rope_base, options.rope_scaling, options.max_position
        )
        # Static (not a parameter): float32 values kept exactly as Python floats.
        self.inv_freq = tuple(float(f) for f in inv_freq)
        projections = init_projections(
            rngs, d_model, num_heads, num_kv_heads, head_dim, param_dtype
        )
        for name, value in projections.items():
            setattr(self, name, value)
        if options.qkv_bias:
            self.b_q = param(jnp.zeros((num_heads, head_dim), param_dtype), ("heads", "head_dim"))
            for name in ("b_k", "b_v"):
                bias = jnp.zeros((num_kv_heads, head_dim), param_dtype)
                setattr(self, name, param(bias, ("kv_heads", "head_dim")))
        if options.out_bias:
            self.b_o = param(jnp.zeros((d_model,), param_dtype), ("embed",))
        self.qk_norm_axes = QK_NORMS[options.qk_norm]
        if self.qk_norm_axes:
            width = len(self.qk_norm_axes)
            for name, heads, axis in (("q", num_heads, "heads"), ("k", num_kv_heads, "kv_heads")):
                shape, axes = (heads, head_dim)[-width:], (axis, "head_dim")[-width:]
                setattr(self, f"{name}_norm", param(jnp.ones(shape, param_dtype), axes))

    def _project(self, x: jax.Array, positions: jax.Array | None):
        """Queries, keys and values of `x [batch, length, d_model]`, normed and rotated at
        `positions [batch, length]` (None: 0..length-1)."""
        x = x.astype(self.dtype)
        projected = []
        for name in ("q", "k", "v"):
            y = jnp.einsum("bld,dhk->blhk", x, getattr(self, f"w_{name}")[...].astype(self.dtype))
            if hasattr(self, f"b_{name}"):
                y = y + getattr(self, f"b_{name}")[...].astype(self.dtype)
            projected.append(y)
        q, k, v = projected
        q = constrain(q, ("batch", "length", "activation_heads", "head_dim"))
        if self.qk_norm_axes:
            q = rms_norm(q, self.q_norm[...], self.norm_eps, self.qk_norm_axes)
            k = rms_norm(k, self.k_norm[...], self.norm_eps, self.qk_norm_axes)
        if positions is None:
            positions = jnp.arange(x.shape[1])
        angles = rotary_angles(positions, self.head_dim, self.rope_base, self.inv_freq)
        scale = self.rope_attention_factor
        return apply_rotary(q, angles, scale), apply_rotary(k, angles, scale), v

    def _output(self, out: jax.Array) -> jax.Array:
        y = jnp.einsum("blhk,hkd->bld", out, self.w_o[...].astype(self.dtype))
        if hasattr(self, "b_o"):
            y = y + self.b_o[...].astype(self.dtype)
        return y

    def __call__(
        self, x: jax.Array, positions: jax.Array | None = None, *, return_probs: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """`x [batch, length, d_model]` -> `[batch, length, d_model]`.

        `positions [batch, length]` int32 are the tokens' places in their sequence for the
        rotary angles (default 0..length-1; mixture-of-depths passes the selected tokens'
        original places). `return_probs` also returns the head-averaged attention weights
        `[batch, length, length]`.
        """
        check_hidden("Attention", x, self.d_model)
        if positions is not None:
            require(
                tuple(positions.shape) == x.shape[:2],
                "Attention: positions.shape",
                tuple(positions.shape),
                f"[batch, length] = {list(x.shape[:2])}",
            )
        q, k, v = self._project(x, positions)
        out = causal_attention(q, k, v, return_probs=return_probs)
        probs = None
        if return_probs:
            out, probs = out
        y = self._output(out)
        return (y, probs) if return_probs else y

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty cache of `max_len` positions for `batch` sequences."""
        dtype = self.dtype if dtype is None else dtype
        hd = self.head_dim
        return KVCache.zeros(batch, max_len, self.num_kv_heads, hd, hd, dtype)

    def decode(
        self, x: jax.Array, positions: jax.Array, cache: KVCache
    ) -> tuple[jax.Array, KVCache]:
        """`x [batch, n, d_model]` at `positions [batch, n]` (a prompt, n > 1, or one new
        token) -> (`[batch, n, d_model]`, the cache with their keys and values written)."""
        check_hidden("Attention", x, self.d_model)
        q, k, v = self._project(x, positions)
        cache = KVCache(
            write_cache(cache.key, k, positions), write_cache(cache.value, v, positions)
        )
        out = cached_attention(q, cache.key.astype(q.dtype), cache.value.astype(q.dtype), positions)
        return self._output(out), cache
