"""Block-sparse attention in plain XLA, flash-style: linear in length and cache-sized steps.

The work is cut into rows, one per (batch, query block) with all its heads. A row gathers, per
head, the k and v blocks its visit list names (`mask_info.visit_lists`, padded to the static
`max_kv_blocks`) and runs a masked softmax over just those, in at least float32. Rows run in
chunks of a few MiB of gathered blocks and logits (`lax.map` forward, `lax.scan` backward), so
the working set stays in cache at any length. The backward pass is written out
(`jax.custom_vjp`): it keeps only q, k, v, the output and the per-row logsumexp, recomputes
each chunk's probabilities, and adds the chunk's k and v gradients into their blocks. Nothing
`[q_len, kv_len]`-sized is ever built and the gathered blocks are never stored for the
backward pass.

q, k, v, the output and every gradient stay in the caller's `[batch, length, heads, d]`
layout, viewed as blocks by reshapes; only the chunks are transposed (heads first, in cache)
for the matmuls. Whole-array transposes would be copies, and copies are temporaries: XLA:CPU
allocates an executable's temporaries afresh on every call, and once they pass glibc's 32 MiB
mmap threshold every call pays a page fault per 4 KiB. With head-major copies of q, k, v and
their gradients that happened between 8k and 16k tokens and made that doubling cost 2.4x;
without them the temporaries at 16k are 10 MiB instead of 51 (`benchmarks/attention.py`).

This is what "auto" runs on CPU, where Pallas kernels only exist in (slow) interpret mode.
Measured on the 2-core development machine (32 MiB L3): the earlier form, one pass over all
rows differentiated by `jax.grad`, cost 5x per doubling where its temporaries outgrew the
cache.
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
    """What each row visits. A row is one (batch, query block) with all its heads, so q, the
    output and their gradients are rows of the `[batch * q_blocks, block_q, heads, head_dim]`
    view of `[batch, q_len, heads, head_dim]`: a reshape, no copy. R rows, padded to a whole
    number of chunks only when no chunk size near the budget divides them.

    flat_kv: int32 [R, heads, width]: index of each visited block in the `[batch * kv_blocks,
      block_kv, kv_heads, head_dim]` view of k and v (again a reshape).
    kv_block: int32 [R, heads, width]: the visited kv block (for positions).
    counts: int32 [R, heads]: how many of the `width` slots are real (padding rows have 0).
    q_block: int32 [R]: the row's query block.
    visible: bool [R, heads, block_q, width * block_kv] from the element mask and segment
      ids, or None.
    """

    flat_kv: jax.Array
    kv_block: jax.Array
    counts: jax.Array
    q_block: jax.Array
    visible: jax.Array | None


def chunk_rows(num_rows: int, row_bytes: int) -> int:
    """Rows per chunk: as many as fit `CHUNK_BYTES`, at least 1, at most `num_rows`."""
    return max(1, min(num_rows, CHUNK_BYTES // max(row_bytes, 1)))


def chunk_plan(num_rows: int, row_bytes: int) -> tuple[int, int]:
    """(rows per chunk, rows after padding). The largest chunk within the budget that divides
    `num_rows` and is more than half the budget, so q and dout need no padded copy; else the
    budget itself, with the rows padded up to a multiple of it."""
    budget = chunk_rows(num_rows, row_bytes)
    for chunk in range(budget, budget // 2, -1):
        if num_rows % chunk == 0:
            return chunk, num_rows
    return budget, -(-num_rows // budget) * budget


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
    batch, q_len, heads, head_dim = q.shape
    width = visits.indices.shape[-1]
    row_bytes = _row_bytes(spec, heads, head_dim, width)
    chunk, padded = chunk_plan(batch * q_len // spec.block_q, row_bytes)
    rows = _rows(q.shape, visits, element_mask, q_segment_ids, kv_segment_ids, spec, padded)
    return _flash(q, k, v, rows, spec, chunk)


def _rows(q_shape, visits, element_mask, q_segment_ids, kv_segment_ids, spec, padded) -> Rows:
    """The `Rows` of these visit lists and masks, padded to `padded` rows."""
    batch, q_len, heads, _ = q_shape
    bq, bk = spec.block_q, spec.block_kv
    q_blocks, kv_blocks = q_len // bq, spec.kv_len // bk
    width = visits.indices.shape[-1]
    index = jnp.broadcast_to(visits.indices, (batch, heads, q_blocks, width))
    counts = jnp.broadcast_to(visits.counts, (batch, heads, q_blocks))
    b_ix = jnp.arange(batch)[:, None, None, None]
    flat_kv = b_ix * kv_blocks + index
    q_block = jnp.broadcast_to(jnp.arange(q_blocks)[None, :], (batch, q_blocks))

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

    num_rows = batch * q_blocks

    def flat(x):
        # [batch, heads, q_blocks, ...] -> [rows, heads, ...], rows ordered (batch, q block);
        # padding rows are zeros (False): a count of 0 means they see nothing.
        return _padding(jnp.swapaxes(x, 1, 2).reshape((num_rows, heads) + x.shape[3:]), padded)

    if visible is not None:
        visible = jnp.broadcast_to(visible, (batch, heads, q_blocks, bq, width, bk))
        visible = flat(visible).reshape(padded, heads, bq, width * bk)
    return Rows(
        flat_kv=flat(flat_kv).astype(jnp.int32),
        kv_block=flat(index).astype(jnp.int32),
        counts=flat(counts).astype(jnp.int32),
        q_block=_padding(q_block.reshape(num_rows), padded).astype(jnp.int32),
        visible=visible,
    )


def _row_bytes(spec: AttentionSpec, heads: int, head_dim: int, width: int) -> int:
    keys = width * spec.block_kv
    return 4 * heads * (2 * keys * head_dim + 3 * spec.block_q * keys)


def _padding(x: jax.Array, padded: int) -> jax.Array:
    """Zero rows appended along axis 0 up to `padded` (no copy when none are needed)."""
    if x.shape[0] == padded:
        return x
    return jnp.pad(x, [(0, padded - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def _q_rows(x: jax.Array, block: int, padded: int) -> jax.Array:
    """[batch, length, heads, d] -> [padded, block, heads, d]: a reshape, plus padding rows
    only when the chunk plan needs them."""
    batch, length, heads, d = x.shape
    return _padding(x.reshape(batch * (length // block), block, heads, d), padded)


def _kv_view(x: jax.Array, block: int) -> jax.Array:
    """[batch, kv_len, kv_heads, d] -> [batch * kv_blocks, block, kv_heads, d] (a reshape)."""
    batch, length, kv_heads, d = x.shape
    return x.reshape(batch * (length // block), block, kv_heads, d)


def _chunked(rows_tree, chunk: int):
    """Leaves [R, ...] -> [R // chunk, chunk, ...] (None stays None)."""
    return jax.tree.map(lambda x: x.reshape((-1, chunk) + x.shape[1:]), rows_tree)


def _kv_head_of(heads: int, kv_heads: int) -> jax.Array:
    """int32 [heads]: the kv head each query head reads."""
    return jnp.arange(heads, dtype=jnp.int32) // (heads // kv_heads)


def _gather(view: jax.Array, flat_kv: jax.Array, kv_head: jax.Array) -> jax.Array:
    """[N, bk, kv_heads, d] view, [C, heads, w] block indices -> [C, heads, w * bk, d]."""
    picked = view[flat_kv, :, kv_head[None, :, None], :]  # [C, heads, w, bk, d]
    chunk, heads, width, bk, d = picked.shape
    return picked.reshape(chunk, heads, width * bk, d)


def _logits(q_heads, k_sel, rows: Rows, spec: AttentionSpec, compute_dtype):
    """Masked, scaled, soft-capped logits [C, heads, block_q, width * block_kv] of q
    [C, heads, block_q, d], and the capped logits before masking (for the soft cap's
    gradient)."""
    chunk, heads, bq, _ = q_heads.shape
    width, bk = rows.kv_block.shape[-1], spec.block_kv
    s = jnp.einsum("chqd,chkd->chqk", q_heads, k_sel, preferred_element_type=compute_dtype)
    s = s * spec.scale
    if spec.logit_soft_cap is not None:
        s = spec.logit_soft_cap * jnp.tanh(s / spec.logit_soft_cap)
    slot = jnp.arange(width)[:, None]
    mask = jnp.broadcast_to(slot < rows.counts[..., None, None], (chunk, heads, width, bk))
    mask = mask.reshape(chunk, heads, 1, width * bk)
    q_pos = rows.q_block[:, None] * bq + jnp.arange(bq) + spec.q_offset  # [C, bq]
    kv_pos = rows.kv_block[..., None] * bk + jnp.arange(bk)  # [C, heads, w, bk]
    q_pos = q_pos[:, None, :, None]
    kv_pos = kv_pos.reshape(chunk, heads, 1, width * bk)
    if spec.causal or spec.window is not None:
        mask = mask & (q_pos >= kv_pos)
    if spec.window is not None:
        mask = mask & (kv_pos > q_pos - spec.window)
    if rows.visible is not None:
        mask = mask & rows.visible
    return jnp.where(mask, s, -jnp.inf), s


def _heads_major(x: jax.Array) -> jax.Array:
    """[C, block, heads, d] <-> [C, heads, block, d]. Done per chunk (in cache) so that every
    matmul has its batch dimensions leading, the layout XLA:CPU's fast dot kernels take."""
    return jnp.swapaxes(x, 1, 2)


def _forward_chunk(q_rows, k_view, v_view, rows: Rows, spec: AttentionSpec):
    """Output [C, block_q, heads, d] and logsumexp [C, heads, block_q, 1] of one chunk."""
    compute_dtype = jnp.promote_types(q_rows.dtype, jnp.float32)
    kv_head = _kv_head_of(q_rows.shape[2], k_view.shape[2])
    k_sel, v_sel = _gather(k_view, rows.flat_kv, kv_head), _gather(v_view, rows.flat_kv, kv_head)
    s, _ = _logits(_heads_major(q_rows), k_sel, rows, spec, compute_dtype)
    row_max = jnp.max(s, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    # Masked logits are -inf: exp gives 0, so rows that see nothing sum to 0 (output 0).
    weights = jnp.exp(s - row_max)
    total = jnp.sum(weights, axis=-1, keepdims=True)  # [C, heads, bq, 1]
    safe_total = jnp.where(total == 0, 1.0, total)
    out = jnp.einsum(
        "chqk,chkd->chqd", weights.astype(v_sel.dtype), v_sel, preferred_element_type=compute_dtype
    )
    out = _heads_major(out / safe_total)
    lse = jnp.where(total == 0, 0.0, row_max + jnp.log(safe_total))
    return out, lse


def _run_forward(q, k, v, rows: Rows, spec: AttentionSpec, chunk: int):
    """Output rows [R, block_q, heads, d] (compute dtype) and logsumexp [R, heads, block_q, 1]."""
    padded = rows.counts.shape[0]
    q_rows = _q_rows(q, spec.block_q, padded)
    k_view, v_view = _kv_view(k, spec.block_kv), _kv_view(v, spec.block_kv)
    step = lambda xs: _forward_chunk(xs[0], k_view, v_view, xs[1], spec)
    if chunk == padded:
        return step((q_rows, rows))
    out, lse = jax.lax.map(step, _chunked((q_rows, rows), chunk))
    return out.reshape((padded,) + out.shape[2:]), lse.reshape((padded,) + lse.shape[2:])


def _unrows(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """[padded, block, heads, d] rows -> `shape` [batch, length, heads, d]."""
    batch, length = shape[:2]
    return x[: batch * (length // x.shape[1])].reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, rows: Rows, spec: AttentionSpec, chunk: int):
    out, _ = _run_forward(q, k, v, rows, spec, chunk)
    return _unrows(out, q.shape).astype(q.dtype)


def _flash_forward(q, k, v, rows: Rows, spec: AttentionSpec, chunk: int):
    out, lse = _run_forward(q, k, v, rows, spec, chunk)
    return _unrows(out, q.shape).astype(q.dtype), (q, k, v, rows, out, lse)


def _flash_backward(spec: AttentionSpec, chunk: int, residuals, dout):
    q, k, v, rows, out, lse = residuals
    padded = rows.counts.shape[0]
    compute_dtype = out.dtype
    heads, kv_heads = q.shape[2], k.shape[2]
    q_rows = _q_rows(q, spec.block_q, padded)
    do_rows = _q_rows(dout, spec.block_q, padded).astype(compute_dtype)
    delta = jnp.swapaxes(jnp.sum(do_rows * out, axis=-1, keepdims=True), 1, 2)  # [R, h, bq, 1]
    k_view, v_view = _kv_view(k, spec.block_kv), _kv_view(v, spec.block_kv)
    kv_head = _kv_head_of(heads, kv_heads)

    def step(grads, xs):
        dk_view, dv_view = grads
        q_c, do_c, lse_c, delta_c, rows_c = xs
        k_sel, v_sel = (
            _gather(k_view, rows_c.flat_kv, kv_head),
            _gather(v_view, rows_c.flat_kv, kv_head),
        )
        q_c, do_c = _heads_major(q_c), _heads_major(do_c)
        s, capped = _logits(q_c, k_sel, rows_c, spec, compute_dtype)
        p = jnp.exp(s - lse_c)  # 0 where masked
        dp = jnp.einsum("chqd,chkd->chqk", do_c, v_sel, preferred_element_type=compute_dtype)
        ds = p * (dp - delta_c)
        if spec.logit_soft_cap is not None:
            ds = ds * (1.0 - jnp.square(capped / spec.logit_soft_cap))
        ds = ds * spec.scale
        dq = jnp.einsum("chqk,chkd->chqd", ds, k_sel.astype(compute_dtype))
        dk = jnp.einsum("chqk,chqd->chkd", ds, q_c.astype(compute_dtype))
        dv = jnp.einsum("chqk,chqd->chkd", p, do_c)
        shape = rows_c.flat_kv.shape + (spec.block_kv, q.shape[-1])  # [C, heads, w, bk, d]
        where = (rows_c.flat_kv, slice(None), kv_head[None, :, None], slice(None))
        dk_view = dk_view.at[where].add(dk.reshape(shape))
        dv_view = dv_view.at[where].add(dv.reshape(shape))
        return (dk_view, dv_view), _heads_major(dq)

    zeros = jnp.zeros(k_view.shape, compute_dtype)
    xs = (q_rows, do_rows, lse, delta, rows)
    if chunk == padded:
        (dk_view, dv_view), dq = step((zeros, zeros), xs)
    else:
        (dk_view, dv_view), dq = jax.lax.scan(step, (zeros, zeros), _chunked(xs, chunk))
        dq = dq.reshape((padded,) + dq.shape[2:])
    dq = _unrows(dq, q.shape).astype(q.dtype)
    dk = dk_view.reshape(k.shape).astype(k.dtype)
    dv = dv_view.reshape(v.shape).astype(v.dtype)
    return dq, dk, dv, None


_flash.defvjp(_flash_forward, _flash_backward)
