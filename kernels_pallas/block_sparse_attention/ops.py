"""The public block-sparse attention: argument checks, the choice of implementation, and the
`jax.custom_vjp` that binds the Pallas forward kernel to its two backward kernels."""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from kernels_pallas import varying
from kernels_pallas.block_sparse_attention import checks, mask_info, xla
from kernels_pallas.block_sparse_attention.spec import AttentionSpec
from kernels_pallas.platform import target_platform

# "interpret" interprets the kernel "pallas" would compile on this backend, and the GPU
# (Triton-style) kernel on CPU; "interpret_tpu" / "interpret_gpu" pick one explicitly.
BSA_IMPLS = ("auto", "pallas", "interpret", "interpret_tpu", "interpret_gpu", "xla")


class KernelOperands(NamedTuple):
    """Non-differentiable arrays of a kernel call, in the layouts the kernels read.

    forward, backward: visit lists of query blocks and of kv blocks (`mask_info.VisitLists`).
    element_mask: int8 [batch or 1, heads or 1, q_len, kv_len] or None.
    q_segment_ids: int32 [batch, q_len, 1] or None; kv_segment_ids: int32 [batch, 1, kv_len].
    """

    forward: mask_info.VisitLists
    backward: mask_info.VisitLists
    element_mask: jax.Array | None
    q_segment_ids: jax.Array | None
    kv_segment_ids: jax.Array | None


def block_sparse_attention(
    q: ArrayLike,
    k: ArrayLike,
    v: ArrayLike,
    block_mask: ArrayLike,
    *,
    block_q: int,
    block_kv: int,
    element_mask: ArrayLike | None = None,
    causal: bool = False,
    window: int | None = None,
    q_segment_ids: ArrayLike | None = None,
    kv_segment_ids: ArrayLike | None = None,
    scale: float | None = None,
    logit_soft_cap: float | None = None,
    max_kv_blocks: int | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Softmax attention that visits only the (query block, kv block) pairs `block_mask` allows.

    Inside visited blocks, an element (query i, key j) also needs every optional mask to allow
    it. Query i sits at position i + kv_len - q_len (positions aligned at the end, so a short
    query block after a cache sees the cache), and `causal` keeps j <= that position, `window`
    keeps j in (position - window, position]. Query rows with no visible key give zeros (also
    in the gradients: never NaN). Logits, softmax and accumulation are at least float32.

    Args:
      q: [batch, q_len, heads, head_dim].
      k, v: [batch, kv_len, kv_heads, head_dim] (the `jax.nn.dot_product_attention` layout);
        heads % kv_heads == 0 and query head h reads kv head h // (heads // kv_heads).
      block_mask: bool [batch or 1, heads or 1, q_len // block_q, kv_len // block_kv],
        True = visit. May be traced (e.g. top-k routed blocks computed under jit).
      block_q, block_kv: block sizes; q_len and kv_len must be multiples of them.
      element_mask: optional bool [batch or 1, heads or 1, q_len, kv_len] for partial blocks.
      causal: keep keys at or before each query's position.
      window: keep keys in the last `window` positions up to each query's (implies causal).
      q_segment_ids, kv_segment_ids: optional int32 [batch, q_len] and [batch, kv_len];
        packed sequences: a query sees keys of its own segment only.
      scale: multiplies q.k; defaults to head_dim ** -0.5.
      logit_soft_cap: logits become cap * tanh(logits / cap).
      max_kv_blocks: static bound on visited kv blocks per query block row. None: the exact
        maximum for a concrete (numpy / host) mask, all kv blocks for a traced one. For a
        traced mask, rows that visit more keep their first `max_kv_blocks` blocks.
      impl: one of `BSA_IMPLS`. "xla": gathers of the visited blocks, linear in length (`xla`);
        "pallas": the compiled kernel of this backend (`tpu` on TPU, `gpu` on GPU; an error on
        CPU); "interpret": that kernel in interpret mode, the GPU one on CPU;
        "interpret_tpu" / "interpret_gpu": the named kernel in interpret mode; "auto": "pallas"
        on TPU and GPU, "xla" on CPU.

    Returns:
      [batch, q_len, heads, head_dim] in the dtype of q.
    """
    kernel = resolve_impl(impl)
    checks.check_positive_int("block_q", block_q)
    checks.check_positive_int("block_kv", block_kv)
    checks.check_scalars(scale, logit_soft_cap, window)
    if not isinstance(causal, bool):
        raise ValueError(f"causal: got {causal!r}; allowed: True or False")
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    checks.check_operands(q, k, v, block_q, block_kv)
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    q_blocks, kv_blocks = q_len // block_q, kv_len // block_kv
    mask_for_count = block_mask
    block_mask = jnp.asarray(block_mask)
    checks.check_mask(
        "block_mask",
        block_mask,
        batch,
        heads,
        q_blocks,
        kv_blocks,
        "q_len // block_q, kv_len // block_kv",
    )
    if element_mask is not None:
        element_mask = jnp.asarray(element_mask)
        checks.check_mask(
            "element_mask", element_mask, batch, heads, q_len, kv_len, "q_len, kv_len"
        )
    if q_segment_ids is not None:
        q_segment_ids = jnp.asarray(q_segment_ids)
    if kv_segment_ids is not None:
        kv_segment_ids = jnp.asarray(kv_segment_ids)
    checks.check_segment_ids(q_segment_ids, kv_segment_ids, batch, q_len, kv_len)
    width = checks.resolve_max_visits("max_kv_blocks", max_kv_blocks, mask_for_count, kv_blocks)
    spec = AttentionSpec(
        q_len=q_len,
        kv_len=kv_len,
        block_q=block_q,
        block_kv=block_kv,
        scale=float(head_dim**-0.5 if scale is None else scale),
        causal=causal,
        window=window,
        logit_soft_cap=None if logit_soft_cap is None else float(logit_soft_cap),
        max_kv_blocks=width,
    )
    # A host mask is listed in numpy: `jnp.asarray` under jit would make it a constant that XLA
    # sorts at compile time (seconds at 16k tokens).
    listed = mask_for_count if mask_info.is_concrete(mask_for_count) else block_mask
    forward = mask_info.visit_lists(listed, width)
    if kernel == "xla":
        return xla.attention(q, k, v, forward, element_mask, q_segment_ids, kv_segment_ids, spec)

    transposed = mask_info.transpose_block_mask(block_mask)
    # The backward lists of k and v: exact width for a concrete mask, every block otherwise.
    needed = mask_info.static_max_visits(transposed)
    q_width = q_blocks if needed is None else max(needed, 1)
    spec = dataclasses.replace(spec, max_q_blocks=q_width)
    operands = KernelOperands(
        forward=forward,
        backward=mask_info.visit_lists(transposed, q_width),
        element_mask=None if element_mask is None else element_mask.astype(jnp.int8),
        q_segment_ids=None if q_segment_ids is None else q_segment_ids[:, :, None],
        kv_segment_ids=None if kv_segment_ids is None else kv_segment_ids[:, None, :],
    )
    # Inside shard_map: the custom_vjp's cotangents vary over the axes its inputs vary over, so
    # q, k, v enter varying over the same ones (see `kernels_pallas.varying`).
    q, k, v = varying.vary_together(q, k, v)
    # Kernels read heads-major [batch, heads, length, head_dim] blocks.
    out = _attention(
        q.transpose(0, 2, 1, 3),
        k.transpose(0, 2, 1, 3),
        v.transpose(0, 2, 1, 3),
        operands,
        spec,
        kernel,
    )
    return out.transpose(0, 2, 1, 3)


def resolve_impl(impl: str) -> str:
    """The kernel `impl` names on the target platform (`kernels_pallas.platform`): "xla", or
    (module, mode) as a string "tpu:compiled", "tpu:interpret", "gpu:compiled", "gpu:interpret".
    """
    if impl not in BSA_IMPLS:
        raise ValueError(f"impl: unknown value {impl!r}; allowed: {', '.join(BSA_IMPLS)}")
    backend = target_platform()
    if impl == "auto":
        impl = "xla" if backend not in ("tpu", "gpu") else "pallas"
    if impl == "xla":
        return "xla"
    if impl == "interpret_tpu":
        return "tpu:interpret"
    if impl == "interpret_gpu":
        return "gpu:interpret"
    if impl == "interpret":
        return "tpu:interpret" if backend == "tpu" else "gpu:interpret"
    if backend not in ("tpu", "gpu"):
        raise ValueError(
            f"impl: 'pallas' compiles a kernel for TPU or GPU, but the backend is {backend!r}; "
            "use 'xla' (or 'auto'), or 'interpret' to run the kernel in interpret mode"
        )
    return f"{backend}:compiled"


def _module(kernel: str):
    # Imported on use: each kernel module pulls in its backend's Pallas dialect.
    if kernel.startswith("tpu"):
        from kernels_pallas.block_sparse_attention import tpu

        return tpu
    from kernels_pallas.block_sparse_attention import gpu

    return gpu


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    operands: KernelOperands,
    spec: AttentionSpec,
    kernel: str,
) -> jax.Array:
    out, _ = _forward(q, k, v, operands, spec, kernel)
    return out


def _forward(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    operands: KernelOperands,
    spec: AttentionSpec,
    kernel: str,
) -> tuple[jax.Array, jax.Array]:
    """Output [b, h, q_len, d] and float32 logsumexp [b, h, q_len, 1] of the chosen kernel."""
    module = _module(kernel)
    return module.forward(q, k, v, operands, spec, interpret=kernel.endswith("interpret"))


def _attention_fwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    operands: KernelOperands,
    spec: AttentionSpec,
    kernel: str,
) -> tuple[jax.Array, tuple]:
    out, lse = _forward(q, k, v, operands, spec, kernel)
    return out, (q, k, v, operands, out, lse)


def _attention_bwd(
    spec: AttentionSpec, kernel: str, residuals: tuple, dout: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, KernelOperands]:
    q, k, v, operands, out, lse = residuals
    module = _module(kernel)
    interpret = kernel.endswith("interpret")
    # The softmax's backward needs rowsum(dout * out) per query: [batch, heads, q_len, 1].
    delta = jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32), axis=-1, keepdims=True)
    dout = dout.astype(q.dtype)
    dq = module.backward_dq(q, k, v, dout, lse, delta, operands, spec, interpret=interpret)
    dk, dv = module.backward_dkv(q, k, v, dout, lse, delta, operands, spec, interpret=interpret)
    # The kernels give one dk, dv per query head; kv heads sum over their query-head group.
    batch, heads, kv_len, head_dim = dk.shape
    kv_heads = k.shape[1]
    group_shape = (batch, kv_heads, heads // kv_heads, kv_len, head_dim)
    dk = dk.reshape(group_shape).sum(axis=2).astype(k.dtype)
    dv = dv.reshape(group_shape).sum(axis=2).astype(v.dtype)
    zeros = jax.tree.map(lambda _: None, operands)
    return dq.astype(q.dtype), dk, dv, zeros


_attention.defvjp(_attention_fwd, _attention_bwd)
