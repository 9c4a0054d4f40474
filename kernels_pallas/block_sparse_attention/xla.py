"""Block-sparse attention in plain XLA, flash-style: linear in length and cache-sized steps.

The work is cut into rows, one per (batch, head, query block). A row gathers the k and v blocks
its visit list names (`mask_info.visit_lists`, padded to the static `max_kv_blocks`) and runs a
masked softmax over just those, in at least float32. Rows run in chunks of a few MiB of
gathered blocks and logits (`lax.map` forward, `lax.scan` backward), so the working set stays
in cache at any length. The backward pass is written out (`jax.custom_vjp`): it keeps only q,
k, v, the output and the per-row logsumexp, recomputes each chunk's probabilities, and adds the
chunk's k and v gradients into their blocks. Nothing `[q_len, kv_len]`-sized is ever built and
the gathered blocks are never stored for the backward pass.

This is what "auto" runs on CPU, where Pallas kernels only exist in (slow) interpret mode.
Measured on the 2-core development machine (32 MiB L3): the earlier form, one pass over all
rows differentiated by `jax.grad`, cost 5x per doubling where its temporaries outgrew the
cache (`benchmarks/attention.py`).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels_pallas.block_sparse_attention.mask_info import VisitLists
from kernels_pallas.block_sparse_attention.spec import AttentionSpec

# Gathered k and v blocks plus logits and probabilities of one chunk of rows, in bytes.
CHUNK_BYTES = 4 * 2**20


class Rows(NamedTuple):
    """What each row visits; R rows padded to a whole number of chunks.

    flat_kv: int32 [R, width]: index of each visited block in the `[batch * kv_heads *
      kv_blocks, block_kv, head_dim]` view of k and v.
    kv_block: int32 [R, width]: the visited kv block (for positions).
    counts: int32 [R]: how many of the `width` slots are real (padding rows have 0).
    q_block: int32 [R]: the row's query block.
    visible: bool [R, block_q, width * block_kv] from the element mask and segment ids, or None.
    """

    flat_kv: jax.Array
    kv_block: jax.Array
    counts: jax.Array
    q_block: jax.Array
    visible: jax.Array | None


def chunk_rows(num_rows: int, row_bytes: int) -> int:
    """Rows per chunk: as many as fit `CHUNK_BYTES`, at least 1, at most `num_rows`."""
    return max(1, min(num_rows, CHUNK_BYTES // max(row_bytes, 1)))


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    visits: VisitLists,
    element_mask: jax.Array | None,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    spec: AttentionSpec,
) -> jax.Array:
    """Flash-style block-sparse attention; arguments already checked by `ops`.

    Args:
      q: [batch, q_len, heads, head_dim].
      k, v: [batch, kv_len, kv_heads, head_dim].
      visits: lists of shape [batch or 1, heads or 1, q_blocks, max_kv_blocks].
      element_mask: bool [batch or 1, heads or 1, q_len, kv_len] or None.
      q_segment_ids, kv_segment_ids: int32 [batch, q_len], [batch, kv_len], or both None.
      spec: the static configuration.

    Returns:
      [batch, q_len, heads, head_dim] in the dtype of q.
    """
    rows = _rows(q.shape, k.shape, visits, element_mask, q_segment_ids, kv_segment_ids, spec)
    return _flash(q, k, v, rows, spec)


def _rows(q_shape, k_shape, visits, element_mask, q_segment_ids, kv_segment_ids, spec) -> Rows:
    batch, q_len, heads, head_dim = q_shape
    kv_heads = k_shape[2]
    bq, bk = spec.block_q, spec.block_kv
    q_blocks, kv_blocks = q_len // bq, spec.kv_len // bk
    width = visits.indices.shape[-1]
    index = jnp.broadcast_to(visits.indices, (batch, heads, q_blocks, width))
    counts = jnp.broadcast_to(visits.counts, (batch, heads, q_blocks))
    b_ix = jnp.arange(batch)[:, None, None, None]
    kv_head = (jnp.arange(heads) // (heads // kv_heads))[None, :, None, None]
    flat_kv = (b_ix * kv_heads + kv_head) * kv_blocks + index
    q_block = jnp.broadcast_to(jnp.arange(q_blocks)[None, None], (batch, heads, q_blocks))

    visible = None
    if q_segment_ids is not None:
        kv_seg = kv_segment_ids.reshape(batch, kv_blocks, bk)[b_ix, index]  # [b, h, i, w, bk]
        q_seg = q_segment_ids.reshape(batch, 1, q_blocks, bq)[..., None, None]
        visible = q_seg == kv_seg[:, :, :, None]  # [b, h, i, bq, w, bk]
    if element_mask is not None:
        mb, mh = element_mask.shape[:2]
        em = element_mask.reshape(mb, mh, q_blocks, bq, kv_blocks, bk)
        eb = b_ix if mb > 1 else 0
        eh = jnp.arange(heads)[None, :, None, None] if mh > 1 else 0
        ei = jnp.arange(q_blocks)[None, None, :, None]
        em = jnp.swapaxes(em[eb, eh, ei, :, index, :], 3, 4)  # [b, h, i, bq, w, bk]
        visible = em if visible is None else visible & em

    num_rows = batch * heads * q_blocks
    padded = _padded_rows(num_rows, _row_bytes(spec, head_dim, width))

    def flat(x, fill):
        x = x.reshape((num_rows,) + x.shape[3:])
        pad = [(0, padded - num_rows)] + [(0, 0)] * (x.ndim - 1)
        return jnp.pad(x, pad, constant_values=fill)

    if visible is not None:
        visible = jnp.broadcast_to(visible, (batch, heads, q_blocks, bq, width, bk))
        visible = flat(visible, False).reshape(padded, bq, width * bk)
    return Rows(
        flat_kv=flat(flat_kv, 0).astype(jnp.int32),
        kv_block=flat(index, 0).astype(jnp.int32),
        counts=flat(counts, 0).astype(jnp.int32),  # padding rows see nothing
        q_block=flat(q_block, 0).astype(jnp.int32),
        visible=visible,
    )


def _row_bytes(spec: AttentionSpec, head_dim: int, width: int) -> int:
    keys = width * spec.block_kv
    return 4 * (2 * keys * head_dim + 3 * spec.block_q * keys)


def _padded_rows(num_rows: int, row_bytes: int) -> int:
    chunk = chunk_rows(num_rows, row_bytes)
    return -(-num_rows // chunk) * chunk


def _chunk_of(rows: Rows, spec: AttentionSpec, head_dim: int) -> int:
    """The chunk `_rows` padded for: padding made the rows a multiple of it."""
    return chunk_rows(rows.counts.shape[0], _row_bytes(spec, head_dim, rows.flat_kv.shape[-1]))


def _to_rows(x: jax.Array, block: int, padded: int) -> jax.Array:
    """[batch, length, heads, d] -> [padded, block, d] rows ordered (batch, head, block)."""
    batch, length, heads, d = x.shape
    x = x.reshape(batch, length // block, block, heads, d).transpose(0, 3, 1, 2, 4)
    x = x.reshape(-1, block, d)
    return jnp.pad(x, ((0, padded - x.shape[0]), (0, 0), (0, 0)))


def _from_rows(x: jax.Array, shape: tuple[int, ...], block: int) -> jax.Array:
    """The inverse of `_to_rows` (padding rows dropped)."""
    batch, length, heads, d = shape
    x = x[: batch * heads * (length // block)]
    x = x.reshape(batch, heads, length // block, block, d).transpose(0, 2, 3, 1, 4)
    return x.reshape(shape)


def _kv_blocks(x: jax.Array, block: int) -> jax.Array:
    """[batch, kv_len, kv_heads, d] -> [batch * kv_heads * kv_blocks, block, d]."""
    batch, length, kv_heads, d = x.shape
    x = x.reshape(batch, length // block, block, kv_heads, d).transpose(0, 3, 1, 2, 4)
    return x.reshape(-1, block, d)


def _chunked(rows_tree, chunk: int):
    """Leaves [R, ...] -> [R // chunk, chunk, ...] (None stays None)."""
    return jax.tree.map(lambda x: x.reshape((-1, chunk) + x.shape[1:]), rows_tree)


def _logits(q_rows, k_sel, rows: Rows, spec: AttentionSpec, compute_dtype):
    """Masked, scaled, soft-capped logits [C, block_q, width * block_kv] and the capped logits
    before masking (for the soft cap's gradient)."""
    chunk, bq, _ = q_rows.shape
    width, bk = rows.kv_block.shape[-1], spec.block_kv
    s = jnp.einsum("cqd,ckd->cqk", q_rows, k_sel, preferred_element_type=compute_dtype)
    s = s * spec.scale
    if spec.logit_soft_cap is not None:
        s = spec.logit_soft_cap * jnp.tanh(s / spec.logit_soft_cap)
    slot = jnp.arange(width)[:, None]
    mask = jnp.broadcast_to(slot < rows.counts[:, None, None], (chunk, width, bk))
    q_pos = rows.q_block[:, None] * bq + jnp.arange(bq) + spec.q_offset  # [C, bq]
    kv_pos = rows.kv_block[..., None] * bk + jnp.arange(bk)  # [C, w, bk]
    mask = mask.reshape(chunk, 1, width * bk)
    q_pos, kv_pos = q_pos[:, :, None], kv_pos.reshape(chunk, 1, width * bk)
    if spec.causal or spec.window is not None:
        mask = mask & (q_pos >= kv_pos)
    if spec.window is not None:
        mask = mask & (kv_pos > q_pos - spec.window)
    if rows.visible is not None:
        mask = mask & rows.visible
    return jnp.where(mask, s, -jnp.inf), s


def _gather(blocks: jax.Array, flat_kv: jax.Array) -> jax.Array:
    """[N, bk, d] blocks, [C, w] indices -> [C, w * bk, d]."""
    picked = blocks[flat_kv]  # [C, w, bk, d]
    return picked.reshape(picked.shape[0], -1, picked.shape[-1])


def _forward_chunk(q_rows, k_blocks, v_blocks, rows: Rows, spec: AttentionSpec):
    compute_dtype = jnp.promote_types(q_rows.dtype, jnp.float32)
    k_sel, v_sel = _gather(k_blocks, rows.flat_kv), _gather(v_blocks, rows.flat_kv)
    s, _ = _logits(q_rows, k_sel, rows, spec, compute_dtype)
    row_max = jnp.max(s, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    # Masked logits are -inf: exp gives 0, so rows that see nothing sum to 0 (output 0).
    weights = jnp.exp(s - row_max)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    safe_total = jnp.where(total == 0, 1.0, total)
    out = jnp.einsum(
        "cqk,ckd->cqd", weights.astype(v_sel.dtype), v_sel, preferred_element_type=compute_dtype
    )
    out = out / safe_total
    lse = jnp.where(total == 0, 0.0, row_max + jnp.log(safe_total))  # [C, bq, 1]
    return out, lse


def _run_forward(q, k, v, rows: Rows, spec: AttentionSpec):
    padded = rows.counts.shape[0]
    chunk = _chunk_of(rows, spec, q.shape[-1])
    q_rows = _to_rows(q, spec.block_q, padded)
    k_blocks, v_blocks = _kv_blocks(k, spec.block_kv), _kv_blocks(v, spec.block_kv)
    step = lambda xs: _forward_chunk(xs[0], k_blocks, v_blocks, xs[1], spec)
    if chunk == padded:
        out, lse = step((q_rows, rows))
    else:
        out, lse = jax.lax.map(step, _chunked((q_rows, rows), chunk))
        out, lse = out.reshape((padded,) + out.shape[2:]), lse.reshape((padded,) + lse.shape[2:])
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, rows: Rows, spec: AttentionSpec):
    out, _ = _run_forward(q, k, v, rows, spec)
    return _from_rows(out, q.shape, spec.block_q).astype(q.dtype)


def _flash_forward(q, k, v, rows: Rows, spec: AttentionSpec):
    out, lse = _run_forward(q, k, v, rows, spec)
    return _from_rows(out, q.shape, spec.block_q).astype(q.dtype), (q, k, v, rows, out, lse)


def _flash_backward(spec: AttentionSpec, residuals, dout):
    q, k, v, rows, out, lse = residuals
    padded = rows.counts.shape[0]
    head_dim = q.shape[-1]
    chunk = _chunk_of(rows, spec, head_dim)
    compute_dtype = out.dtype
    q_rows = _to_rows(q, spec.block_q, padded)
    do_rows = _to_rows(dout, spec.block_q, padded).astype(compute_dtype)
    delta = jnp.sum(do_rows * out, axis=-1, keepdims=True)  # [R, bq, 1]
    k_blocks, v_blocks = _kv_blocks(k, spec.block_kv), _kv_blocks(v, spec.block_kv)

    def step(grads, xs):
        dk_blocks, dv_blocks = grads
        q_c, do_c, lse_c, delta_c, rows_c = xs
        k_sel, v_sel = _gather(k_blocks, rows_c.flat_kv), _gather(v_blocks, rows_c.flat_kv)
        s, capped = _logits(q_c, k_sel, rows_c, spec, compute_dtype)
        p = jnp.exp(s - lse_c)  # 0 where masked
        dp = jnp.einsum("cqd,ckd->cqk", do_c, v_sel, preferred_element_type=compute_dtype)
        ds = p * (dp - delta_c)
        if spec.logit_soft_cap is not None:
            ds = ds * (1.0 - jnp.square(capped / spec.logit_soft_cap))
        ds = ds * spec.scale
        dq = jnp.einsum("cqk,ckd->cqd", ds, k_sel.astype(compute_dtype))
        dk = jnp.einsum("cqk,cqd->ckd", ds, q_c.astype(compute_dtype))
        dv = jnp.einsum("cqk,cqd->ckd", p, do_c)
        shape = rows_c.flat_kv.shape + (spec.block_kv, head_dim)
        dk_blocks = dk_blocks.at[rows_c.flat_kv].add(dk.reshape(shape))
        dv_blocks = dv_blocks.at[rows_c.flat_kv].add(dv.reshape(shape))
        return (dk_blocks, dv_blocks), dq

    zeros = jnp.zeros(k_blocks.shape, compute_dtype)
    xs = (q_rows, do_rows, lse, delta, rows)
    if chunk == padded:
        (dk_blocks, dv_blocks), dq = step((zeros, zeros), xs)
    else:
        (dk_blocks, dv_blocks), dq = jax.lax.scan(step, (zeros, zeros), _chunked(xs, chunk))
        dq = dq.reshape((padded,) + dq.shape[2:])
    batch, kv_len, kv_heads, _ = k.shape

    def unblock(x, like):
        x = x.reshape(batch, kv_heads, kv_len // spec.block_kv, spec.block_kv, head_dim)
        return x.transpose(0, 2, 3, 1, 4).reshape(like.shape).astype(like.dtype)

    dq = _from_rows(dq, q.shape, spec.block_q).astype(q.dtype)
    return dq, unblock(dk_blocks, k), unblock(dv_blocks, v), None


_flash.defvjp(_flash_forward, _flash_backward)
