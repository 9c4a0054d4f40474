"""Block-sparse flash attention for GPU: Triton-style `pl.pallas_call`s, also run interpreted.

One program per (batch, head, query block) loops over that block's visit list, loading only the
listed k and v blocks from the whole [kv_len, head_dim] rows it is handed (Triton refs are
pointers: a large block costs nothing until it is sliced). The backward pass is two more
kernels in the style of FlashAttention-2 (Dao, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning", 2023): dq with the same loop, and dk, dv with one program
per (batch, head, kv block) looping over the query blocks that visit it. Both reread the
logsumexp saved by the forward pass instead of recomputing the softmax normaliser.

Visit lists reach the kernels as one int32 table [b, h, rows, P]: column 0 is the count,
columns 1.. the indices, P a power of two (Triton loads whole power-of-two blocks).

Compiled (not interpreted), Triton needs block_q, block_kv and head_dim to be powers of two of
at least 16 (the shapes of `tl.dot`); interpret mode takes any sizes. Its tiles must also fit the
chip's shared memory (`kernels_pallas.gpu_chips`): Triton keeps `NUM_STAGES` copies of the
blocks each loop step loads in flight, and `num_stages` drops to one copy where two do not fit
(float32 at blocks of 128 x head_dim 64, bfloat16 at 128 x 128 on H100); blocks that do not fit
even so are a ValueError before anything compiles.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kernels_pallas import gpu_chips, varying
from kernels_pallas.block_sparse_attention import kernel_math as km
from kernels_pallas.block_sparse_attention.spec import AttentionSpec
from kernels_pallas.gpu_chips import GpuChip

NUM_WARPS = 4
NUM_STAGES = 2


def shared_memory_bound(spec: AttentionSpec, head_dim: int, dtype: jnp.dtype, stages: int) -> int:
    """Bytes of shared memory any of the three kernels may ask for, at most.

    Each holds two blocks for the whole loop (q and dout, or k and v) and, `stages` times, the
    two it loads per step, each at most [max(block_q, block_kv), head_dim]; and the float32
    [block_q, block_kv] tile of logits. Checked against the compiler for H100 in
    tests/aot/test_gpu_kernels_compile.py (it is exact for the float32 backward at one stage).
    """
    block = max(spec.block_q, spec.block_kv) * head_dim * jnp.dtype(dtype).itemsize
    return (2 + 2 * stages) * block + spec.block_q * spec.block_kv * 4


def num_stages(spec: AttentionSpec, head_dim: int, dtype: jnp.dtype, chip: GpuChip) -> int:
    """`NUM_STAGES`, or fewer where the chip's shared memory per block takes fewer; a
    ValueError naming the blocks when even one stage does not fit."""
    for stages in range(NUM_STAGES, 0, -1):
        if shared_memory_bound(spec, head_dim, dtype, stages) <= chip.shared_memory_per_block:
            return stages
    raise ValueError(
        f"block_q, block_kv: blocks of {spec.block_q} x {spec.block_kv} at head_dim {head_dim} "
        f"in {jnp.dtype(dtype).name} need up to {shared_memory_bound(spec, head_dim, dtype, 1)} "
        f"bytes of shared memory; allowed: at most {chip.shared_memory_per_block} on "
        f"{chip.device_kind} (smaller blocks, or bfloat16, fit)"
    )


def _table(visits) -> jax.Array:
    """[b, h, rows, P] int32: count, then the indices, zero padded to a power of two."""
    indices, counts = visits.indices, visits.counts
    width = pl.next_power_of_2(indices.shape[-1] + 1)
    table = jnp.concatenate([counts[..., None], indices], axis=-1)
    return jnp.pad(table, [(0, 0)] * 3 + [(0, width - table.shape[-1])])


def _broadcast_index(size: int, index):
    """Index into an axis that is either full-size or broadcast (size 1)."""
    return index if size > 1 else 0


def _call(kernel, grid, in_specs, out_specs, out_shape, interpret: bool, arrays, spec):
    """The `pl.pallas_call`; compiled, with as many pipeline stages as the chip fits for the
    blocks of `spec` and the head_dim and dtype of the query (arrays[1])."""
    params = None
    if not interpret:
        q = arrays[1]
        stages = num_stages(spec, q.shape[-1], q.dtype, gpu_chips.target_chip())
        params = plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=stages)
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=varying.out_structs(out_shape, *arrays),
        interpret=interpret,
        compiler_params=params,
    )(*arrays)


def _mask_specs(operands, spec: AttentionSpec, *, by_q_block: bool):
    """Block specs and arrays of the optional masks, for grids (batch, head, block).

    by_q_block: the grid's last axis walks query blocks (whole kv rows are loaded) or, when
    False, kv blocks (whole query columns are loaded).
    """
    bq, bk, q_len, kv_len = spec.block_q, spec.block_kv, spec.q_len, spec.kv_len
    specs, arrays = [], []
    if operands.element_mask is not None:
        mb, mh = operands.element_mask.shape[:2]
        if by_q_block:
            block = (None, None, bq, kv_len)
            index = lambda b, h, i: (_broadcast_index(mb, b), _broadcast_index(mh, h), i, 0)
        else:
            block = (None, None, q_len, bk)
            index = lambda b, h, i: (_broadcast_index(mb, b), _broadcast_index(mh, h), 0, i)
        specs.append(pl.BlockSpec(block, index))
        arrays.append(operands.element_mask)
    if operands.q_segment_ids is not None:
        if by_q_block:
            specs.append(pl.BlockSpec((None, bq, 1), lambda b, h, i: (b, i, 0)))
            specs.append(pl.BlockSpec((None, 1, kv_len), lambda b, h, i: (b, 0, 0)))
        else:
            specs.append(pl.BlockSpec((None, q_len, 1), lambda b, h, i: (b, 0, 0)))
            specs.append(pl.BlockSpec((None, 1, bk), lambda b, h, i: (b, 0, i)))
        arrays += [operands.q_segment_ids, operands.kv_segment_ids]
    return specs, arrays


def _load_masks(refs, operands, q_rows, kv_cols) -> dict:
    """The optional mask tiles of one (query block, kv block) pair, as `km.visible` kwargs."""
    refs = list(refs)
    tiles = {}
    if operands.element_mask is not None:
        tiles["element"] = refs.pop(0)[q_rows, kv_cols]
    if operands.q_segment_ids is not None:
        tiles["q_segment"] = refs.pop(0)[q_rows, :]
        tiles["kv_segment"] = refs.pop(0)[:, kv_cols]
    return tiles


def _visits_spec(table: jax.Array) -> pl.BlockSpec:
    tb, th = table.shape[:2]
    return pl.BlockSpec(
        (None, None, None, table.shape[-1]),
        lambda b, h, i: (_broadcast_index(tb, b), _broadcast_index(th, h), i, 0),
    )


def _rows(block: int, d: int, head: Callable = lambda h: h) -> pl.BlockSpec:
    """The grid's own `block` rows of a heads-major [b, h, len, d] array."""
    return pl.BlockSpec((None, None, block, d), lambda b, h, i: (b, head(h), i, 0))


def _whole(length: int, d: int, head: Callable = lambda h: h) -> pl.BlockSpec:
    """All `length` rows of one head of a heads-major [b, h, len, d] array."""
    return pl.BlockSpec((None, None, length, d), lambda b, h, i: (b, head(h), 0, 0))


def forward(q, k, v, operands, spec: AttentionSpec, *, interpret: bool):
    """q: [b, h, q_len, d]; k, v: [b, kv_h, kv_len, d] -> out [b, h, q_len, d] and the
    float32 logsumexp [b, h, q_len, 1] (0 for rows with nothing visible)."""
    batch, heads, q_len, d = q.shape
    group = heads // k.shape[1]
    bq, bk = spec.block_q, spec.block_kv
    table = _table(operands.forward)
    mask_specs, mask_arrays = _mask_specs(operands, spec, by_q_block=True)

    def kernel(table_ref, q_ref, k_ref, v_ref, *refs):
        *mask_refs, o_ref, lse_ref = refs
        i = pl.program_id(2)
        q_tile = q_ref[...]

        def body(j, carry):
            kv_block = table_ref[j + 1]
            cols = pl.ds(pl.multiple_of(kv_block * bk, bk), bk)
            masks = _load_masks(mask_refs, operands, slice(None), cols)
            s = km.tile_logits(q_tile, k_ref[cols, :], spec, i, kv_block, masks)
            return km.online_update(s, v_ref[cols, :], *carry)

        init = (
            jnp.full((bq, 1), -jnp.inf, jnp.float32),
            jnp.zeros((bq, 1), jnp.float32),
            jnp.zeros((bq, d), jnp.float32),
        )
        out, lse = km.finalize(*jax.lax.fori_loop(0, table_ref[0], body, init))
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse

    kv_head = lambda h: h // group
    return _call(
        kernel,
        (batch, heads, q_len // bq),
        [
            _visits_spec(table),
            _rows(bq, d),
            _whole(spec.kv_len, d, kv_head),
            _whole(spec.kv_len, d, kv_head),
            *mask_specs,
        ],
        [_rows(bq, d), _rows(bq, 1)],
        [
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, q_len, 1), jnp.float32),
        ],
        interpret,
        [table, q, k, v, *mask_arrays],
        spec,
    )


def backward_dq(q, k, v, dout, lse, delta, operands, spec: AttentionSpec, *, interpret: bool):
    """dq [b, h, q_len, d] float32; one program per query block, as in `forward`."""
    batch, heads, q_len, d = q.shape
    group = heads // k.shape[1]
    bq, bk = spec.block_q, spec.block_kv
    table = _table(operands.forward)
    mask_specs, mask_arrays = _mask_specs(operands, spec, by_q_block=True)

    def kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        *mask_refs, dq_ref = refs
        i = pl.program_id(2)
        q_tile, do_tile = q_ref[...], do_ref[...]
        lse_tile, delta_tile = lse_ref[...], delta_ref[...]

        def body(j, dq):
            kv_block = table_ref[j + 1]
            cols = pl.ds(pl.multiple_of(kv_block * bk, bk), bk)
            k_tile = k_ref[cols, :]
            masks = _load_masks(mask_refs, operands, slice(None), cols)
            tile = (q_tile, k_tile, v_ref[cols, :], do_tile, lse_tile, delta_tile)
            _, ds = km.tile_backward(*tile, spec, i, kv_block, masks)
            return dq + km.matmul(ds.astype(k_tile.dtype), k_tile)

        dq = jax.lax.fori_loop(0, table_ref[0], body, jnp.zeros((bq, d), jnp.float32))
        dq_ref[...] = dq * spec.scale

    kv_head = lambda h: h // group
    return _call(
        kernel,
        (batch, heads, q_len // bq),
        [
            _visits_spec(table),
            _rows(bq, d),
            _whole(spec.kv_len, d, kv_head),
            _whole(spec.kv_len, d, kv_head),
            _rows(bq, d),
            _rows(bq, 1),
            _rows(bq, 1),
            *mask_specs,
        ],
        _rows(bq, d),
        jax.ShapeDtypeStruct(q.shape, jnp.float32),
        interpret,
        [table, q, k, v, dout, lse, delta, *mask_arrays],
        spec,
    )


def backward_dkv(q, k, v, dout, lse, delta, operands, spec: AttentionSpec, *, interpret: bool):
    """dk, dv per query head, [b, h, kv_len, d] float32 each; one program per kv block."""
    batch, heads, q_len, d = q.shape
    group = heads // k.shape[1]
    bq, bk = spec.block_q, spec.block_kv
    table = _table(operands.backward)
    mask_specs, mask_arrays = _mask_specs(operands, spec, by_q_block=False)

    def kernel(table_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
        *mask_refs, dk_ref, dv_ref = refs
        kv_block = pl.program_id(2)
        k_tile, v_tile = k_ref[...], v_ref[...]

        def body(j, carry):
            dk, dv = carry
            q_block = table_ref[j + 1]
            rows = pl.ds(pl.multiple_of(q_block * bq, bq), bq)
            q_tile, do_tile = q_ref[rows, :], do_ref[rows, :]
            masks = _load_masks(mask_refs, operands, rows, slice(None))
            tile = (q_tile, k_tile, v_tile, do_tile, lse_ref[rows, :], delta_ref[rows, :])
            p, ds = km.tile_backward(*tile, spec, q_block, kv_block, masks)
            dv = dv + km.matmul(p.astype(do_tile.dtype), do_tile, transpose_a=True)
            dk = dk + km.matmul(ds.astype(q_tile.dtype), q_tile, transpose_a=True)
            return dk, dv

        zeros = jnp.zeros((bk, d), jnp.float32)
        dk, dv = jax.lax.fori_loop(0, table_ref[0], body, (zeros, zeros))
        dk_ref[...] = dk * spec.scale
        dv_ref[...] = dv

    kv_head = lambda h: h // group
    kv_shape = jax.ShapeDtypeStruct((batch, heads, spec.kv_len, d), jnp.float32)
    return _call(
        kernel,
        (batch, heads, spec.kv_len // bk),
        [
            _visits_spec(table),
            _whole(q_len, d),
            _rows(bk, d, kv_head),
            _rows(bk, d, kv_head),
            _whole(q_len, d),
            _whole(q_len, 1),
            _whole(q_len, 1),
            *mask_specs,
        ],
        [_rows(bk, d), _rows(bk, d)],
        [kv_shape, kv_shape],
        interpret,
        [table, q, k, v, dout, lse, delta, *mask_arrays],
        spec,
    )
