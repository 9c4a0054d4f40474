"""Block-sparse flash attention for TPU (Mosaic), with scalar-prefetched visit lists.

The grid is (batch, head, query block, slot) with one slot per entry of the padded visit list.
The visit lists are scalar-prefetched into SMEM, so the k and v block specs' index maps read
which kv block each slot names and the Pallas pipeline DMAs only those blocks. Padded slots
repeat the previous index, so the pipeline skips their copy, and `pl.when` skips their compute.
Running max, normaliser and output accumulate in VMEM scratch across the slot axis (the same
shape as JAX's splash attention; our own code). The backward pass is a dq kernel over the same
grid and a dk, dv kernel over (batch, head, kv block, slot) walking the transposed lists.

Compiled, Mosaic wants block_q and block_kv multiples of 128 (int8 element-mask tiles and
(8, 128) vector tiles) and the flattened visit lists (about batch * heads * blocks *
max_kv_blocks int32 when the mask is per batch and head) must fit in SMEM.

`interpret=True` runs the TPU interpreter with out-of-bounds reads raising and uninitialised
memory (outputs included) filled with NaN, so a tile the kernel forgets to write shows up.
"""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import varying
from kernels_pallas.block_sparse_attention import kernel_math as km
from kernels_pallas.block_sparse_attention.spec import AttentionSpec

INTERPRET_PARAMS = pltpu.InterpretParams(out_of_bounds_reads="raise", uninitialized_memory="nan")


def _interpret(interpret: bool | pltpu.InterpretParams):
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return INTERPRET_PARAMS if interpret else False


class _Lists:
    """Flattened visit lists (SMEM holds 1-D arrays best) and the index of one grid row."""

    def __init__(self, visits) -> None:
        self.b, self.h, self.rows, self.width = visits.indices.shape
        self.indices = visits.indices.reshape(-1)
        self.counts = visits.counts.reshape(-1)

    def row(self, b, h, i):
        b = b if self.b > 1 else 0
        h = h if self.h > 1 else 0
        return (b * self.h + h) * self.rows + i

    def index(self, indices_ref, b, h, i, j):
        return indices_ref[self.row(b, h, i) * self.width + j]


def _mask_specs(operands, spec: AttentionSpec, lists: _Lists, *, by_q_block: bool):
    """Block specs and arrays of the optional masks on a (b, h, block, slot) grid.

    by_q_block: the grid's third axis is the query block and slots name kv blocks, or the
    other way round (the dk, dv kernel).
    """
    bq, bk = spec.block_q, spec.block_kv

    def pair(b, h, i, j, indices_ref):
        other = lists.index(indices_ref, b, h, i, j)
        return (i, other) if by_q_block else (other, i)

    specs, arrays = [], []
    if operands.element_mask is not None:
        mb, mh = operands.element_mask.shape[:2]

        def element_index(b, h, i, j, indices_ref, counts_ref):
            qb, kb = pair(b, h, i, j, indices_ref)
            return (b if mb > 1 else 0, h if mh > 1 else 0, qb, kb)

        specs.append(pl.BlockSpec((None, None, bq, bk), element_index))
        arrays.append(operands.element_mask)
    if operands.q_segment_ids is not None:
        specs.append(
            pl.BlockSpec((None, bq, 1), lambda b, h, i, j, ir, cr: (b, pair(b, h, i, j, ir)[0], 0))
        )
        specs.append(
            pl.BlockSpec((None, 1, bk), lambda b, h, i, j, ir, cr: (b, 0, pair(b, h, i, j, ir)[1]))
        )
        arrays += [operands.q_segment_ids, operands.kv_segment_ids]
    return specs, arrays


def _load_masks(refs, operands) -> dict:
    refs = list(refs)
    tiles = {}
    if operands.element_mask is not None:
        tiles["element"] = refs.pop(0)[...]
    if operands.q_segment_ids is not None:
        tiles["q_segment"] = refs.pop(0)[...]
        tiles["kv_segment"] = refs.pop(0)[...]
    return tiles


def _slot_phases(lists: _Lists, counts_ref, b, h, i, j, *, start, visit, finish) -> None:
    """The three phases of a kernel whose last grid axis walks row (b, h, i)'s visit list:
    `start` at slot 0, `visit` on every real slot (padding slots skip it), `finish` at the
    last slot. Each is a function of no arguments that writes refs."""
    pl.when(j == 0)(start)
    pl.when(j < counts_ref[lists.row(b, h, i)])(visit)
    pl.when(j == lists.width - 1)(finish)


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, lists, arrays, interpret):
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch,
    )
    return pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=varying.out_structs(out_shape, lists.indices, lists.counts, *arrays),
        interpret=_interpret(interpret),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
    )(lists.indices, lists.counts, *arrays)


def _this_block(block: int, d: int) -> pl.BlockSpec:
    """The grid row's own block of a heads-major [b, h, len, d] array."""
    return pl.BlockSpec((None, None, block, d), lambda b, h, i, j, ir, cr: (b, h, i, 0))


def _listed_block(block: int, d: int, lists: _Lists, head=lambda h: h) -> pl.BlockSpec:
    """The block slot j of the grid row's visit list names."""
    return pl.BlockSpec(
        (None, None, block, d),
        lambda b, h, i, j, ir, cr: (b, head(h), lists.index(ir, b, h, i, j), 0),
    )


def forward(q, k, v, operands, spec: AttentionSpec, *, interpret):
    """q: [b, h, q_len, d]; k, v: [b, kv_h, kv_len, d] -> out [b, h, q_len, d] and the
    float32 logsumexp [b, h, q_len, 1] (0 for rows with nothing visible)."""
    batch, heads, q_len, d = q.shape
    group = heads // k.shape[1]
    bq, bk = spec.block_q, spec.block_kv
    lists = _Lists(operands.forward)
    mask_specs, mask_arrays = _mask_specs(operands, spec, lists, by_q_block=True)

    def kernel(indices_ref, counts_ref, q_ref, k_ref, v_ref, *refs):
        *mask_refs, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
        b, h, i, j = (pl.program_id(axis) for axis in range(4))

        def start():
            m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
            l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
            acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

        def visit():
            kv_block = lists.index(indices_ref, b, h, i, j)
            masks = _load_masks(mask_refs, operands)
            s = km.tile_logits(q_ref[...], k_ref[...], spec, i, kv_block, masks)
            m_ref[...], l_ref[...], acc_ref[...] = km.online_update(
                s, v_ref[...], m_ref[...], l_ref[...], acc_ref[...]
            )

        def finish():
            out, lse = km.finalize(m_ref[...], l_ref[...], acc_ref[...])
            o_ref[...] = out.astype(o_ref.dtype)
            lse_ref[...] = lse

        _slot_phases(lists, counts_ref, b, h, i, j, start=start, visit=visit, finish=finish)

    kv_head = lambda h: h // group
    return _call(
        kernel,
        (batch, heads, q_len // bq, lists.width),
        [
            _this_block(bq, d),
            _listed_block(bk, d, lists, kv_head),
            _listed_block(bk, d, lists, kv_head),
            *mask_specs,
        ],
        [_this_block(bq, d), _this_block(bq, 1)],
        [
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, q_len, 1), jnp.float32),
        ],
        [
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, d), jnp.float32),
        ],
        lists,
        [q, k, v, *mask_arrays],
        interpret,
    )


def backward_dq(q, k, v, dout, lse, delta, operands, spec: AttentionSpec, *, interpret):
    """dq [b, h, q_len, d] float32, over the forward pass's grid."""
    batch, heads, q_len, d = q.shape
    group = heads // k.shape[1]
    bq, bk = spec.block_q, spec.block_kv
    lists = _Lists(operands.forward)
    mask_specs, mask_arrays = _mask_specs(operands, spec, lists, by_q_block=True)

    def kernel(indices_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        *mask_refs, dq_ref, acc_ref = refs
        b, h, i, j = (pl.program_id(axis) for axis in range(4))

        def start():
            acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

        def visit():
            kv_block = lists.index(indices_ref, b, h, i, j)
            k_tile, masks = k_ref[...], _load_masks(mask_refs, operands)
            tile = (q_ref[...], k_tile, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...])
            _, ds = km.tile_backward(*tile, spec, i, kv_block, masks)
            acc_ref[...] += km.matmul(ds.astype(k_tile.dtype), k_tile)

        def finish():
            dq_ref[...] = acc_ref[...] * spec.scale

        _slot_phases(lists, counts_ref, b, h, i, j, start=start, visit=visit, finish=finish)

    kv_head = lambda h: h // group
    return _call(
        kernel,
        (batch, heads, q_len // bq, lists.width),
        [
            _this_block(bq, d),
            _listed_block(bk, d, lists, kv_head),
            _listed_block(bk, d, lists, kv_head),
            _this_block(bq, d),
            _this_block(bq, 1),
            _this_block(bq, 1),
            *mask_specs,
        ],
        _this_block(bq, d),
        jax.ShapeDtypeStruct(q.shape, jnp.float32),
        [pltpu.VMEM((bq, d), jnp.float32)],
        lists,
        [q, k, v, dout, lse, delta, *mask_arrays],
        interpret,
    )


def backward_dkv(q, k, v, dout, lse, delta, operands, spec: AttentionSpec, *, interpret):
    """dk, dv per query head, [b, h, kv_len, d] float32 each, over (b, h, kv block, slot)."""
    batch, heads, q_len, d = q.shape
    group = heads // k.shape[1]
    bq, bk = spec.block_q, spec.block_kv
    lists = _Lists(operands.backward)
    mask_specs, mask_arrays = _mask_specs(operands, spec, lists, by_q_block=False)

    def kernel(indices_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        *mask_refs, dk_ref, dv_ref, dk_acc, dv_acc = refs
        b, h, kv_block, j = (pl.program_id(axis) for axis in range(4))

        def start():
            dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
            dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

        def visit():
            q_block = lists.index(indices_ref, b, h, kv_block, j)
            q_tile, do_tile, masks = q_ref[...], do_ref[...], _load_masks(mask_refs, operands)
            tile = (q_tile, k_ref[...], v_ref[...], do_tile, lse_ref[...], delta_ref[...])
            p, ds = km.tile_backward(*tile, spec, q_block, kv_block, masks)
            dv_acc[...] += km.matmul(p.astype(do_tile.dtype), do_tile, transpose_a=True)
            dk_acc[...] += km.matmul(ds.astype(q_tile.dtype), q_tile, transpose_a=True)

        def finish():
            dk_ref[...] = dk_acc[...] * spec.scale
            dv_ref[...] = dv_acc[...]

        _slot_phases(lists, counts_ref, b, h, kv_block, j, start=start, visit=visit, finish=finish)

    kv_head = lambda h: h // group
    kv_block_spec = pl.BlockSpec(
        (None, None, bk, d), lambda b, h, i, j, ir, cr: (b, kv_head(h), i, 0)
    )
    kv_shape = jax.ShapeDtypeStruct((batch, heads, spec.kv_len, d), jnp.float32)
    return _call(
        kernel,
        (batch, heads, spec.kv_len // bk, lists.width),
        [
            _listed_block(bq, d, lists),
            kv_block_spec,
            kv_block_spec,
            _listed_block(bq, d, lists),
            _listed_block(bq, 1, lists),
            _listed_block(bq, 1, lists),
            *mask_specs,
        ],
        [_this_block(bk, d), _this_block(bk, d)],
        [kv_shape, kv_shape],
        [pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        lists,
        [q, k, v, dout, lse, delta, *mask_arrays],
        interpret,
    )
