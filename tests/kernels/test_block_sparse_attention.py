"""block_sparse_attention's XLA path, reference, visit lists and argument checks.

Every implementation is compared against the dense float64 reference (`reference.py`); the
Pallas kernels' tests (`test_block_sparse_attention_kernels.py`) reuse the problems drawn here.
"""

import dataclasses
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels_pallas import block_sparse_attention
from kernels_pallas.block_sparse_attention import (
    block_sparse_attention_reference,
    dense_mask,
    mask_info,
    xla,
)


@dataclasses.dataclass(frozen=True)
class Problem:
    """Shapes and options of one call; `arrays` draws the operands from `seed`."""

    batch: int
    q_blocks: int
    kv_blocks: int
    heads: int
    kv_heads: int
    head_dim: int
    block_q: int
    block_kv: int
    density: float
    mask_batch: int
    mask_heads: int
    causal: bool
    window: int | None
    segments: bool
    element: bool
    soft_cap: float | None
    scale: float | None
    seed: int

    @property
    def q_len(self) -> int:
        return self.q_blocks * self.block_q

    @property
    def kv_len(self) -> int:
        return self.kv_blocks * self.block_kv

    def arrays(self, dtype=np.float64) -> tuple[tuple[np.ndarray, ...], dict]:
        """(q, k, v, block_mask) and the keyword arguments of the call."""
        rng = np.random.default_rng(self.seed)
        q = rng.standard_normal((self.batch, self.q_len, self.heads, self.head_dim))
        k = rng.standard_normal((self.batch, self.kv_len, self.kv_heads, self.head_dim))
        v = rng.standard_normal((self.batch, self.kv_len, self.kv_heads, self.head_dim))
        mask_shape = (self.mask_batch, self.mask_heads, self.q_blocks, self.kv_blocks)
        block_mask = rng.random(mask_shape) < self.density
        kwargs = dict(
            block_q=self.block_q,
            block_kv=self.block_kv,
            causal=self.causal,
            window=self.window,
            logit_soft_cap=self.soft_cap,
            scale=self.scale,
        )
        if self.element:
            kwargs["element_mask"] = rng.random(mask_shape[:2] + (self.q_len, self.kv_len)) < 0.7
        if self.segments:
            kwargs["q_segment_ids"] = np.sort(rng.integers(0, 3, (self.batch, self.q_len)), axis=1)
            kwargs["kv_segment_ids"] = np.sort(
                rng.integers(0, 3, (self.batch, self.kv_len)), axis=1
            )
            kwargs["q_segment_ids"] = kwargs["q_segment_ids"].astype(np.int32)
            kwargs["kv_segment_ids"] = kwargs["kv_segment_ids"].astype(np.int32)
        return tuple(x.astype(dtype) for x in (q, k, v)) + (block_mask,), kwargs


@st.composite
def problems(draw: st.DrawFn, max_blocks: int = 3) -> Problem:
    """Small problems with every option drawn independently (q_len != kv_len included)."""
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.integers(1, 2))
    block_q = draw(st.sampled_from([4, 8]))
    block_kv = draw(st.sampled_from([4, 8]))
    kv_blocks = draw(st.integers(1, max_blocks))
    return Problem(
        batch=batch,
        q_blocks=draw(st.integers(1, max_blocks)),
        kv_blocks=kv_blocks,
        heads=kv_heads * group,
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([4, 8])),
        block_q=block_q,
        block_kv=block_kv,
        density=draw(st.sampled_from([0.3, 0.6, 1.0])),
        mask_batch=draw(st.sampled_from([1, batch])),
        mask_heads=draw(st.sampled_from([1, kv_heads * group])),
        causal=draw(st.booleans()),
        window=draw(st.one_of(st.none(), st.integers(1, kv_blocks * block_kv))),
        segments=draw(st.booleans()),
        element=draw(st.booleans()),
        soft_cap=draw(st.sampled_from([None, 1.5])),
        scale=draw(st.sampled_from([None, 0.3])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def loss_and_grads(fn, q, k, v):
    """A scalar loss of the output that weights every element differently, and its grads."""
    weights = jnp.asarray(
        np.random.default_rng(0).standard_normal(q.shape[:3] + (v.shape[-1],)), q.dtype
    )

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v) * weights)

    # One compiled program per problem: op-by-op dispatch would compile every op separately.
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)


def check_against_reference(problem: Problem, impl: str, dtype, atol: float, **extra) -> None:
    """Output and dq, dk, dv of `impl` in `dtype` against the float64 dense reference."""
    (q, k, v, block_mask), kwargs = problem.arrays(np.float64)
    with jax.enable_x64(True):
        ref_out = block_sparse_attention_reference(q, k, v, block_mask, **kwargs)
        _, ref_grads = loss_and_grads(
            lambda q, k, v: block_sparse_attention_reference(q, k, v, block_mask, **kwargs),
            q,
            k,
            v,
        )
        ref_out, ref_grads = np.asarray(ref_out), [np.asarray(g) for g in ref_grads]
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    fn = lambda q, k, v: block_sparse_attention(q, k, v, block_mask, impl=impl, **kwargs, **extra)
    out = jax.jit(fn)(q, k, v)
    chex.assert_type(out, dtype)
    chex.assert_tree_all_finite(out)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref_out, atol=atol, rtol=atol)
    _, grads = loss_and_grads(fn, q, k, v)
    for name, grad, ref in zip("qkv", grads, ref_grads, strict=True):
        chex.assert_tree_all_finite(grad)
        np.testing.assert_allclose(
            np.asarray(grad, np.float64), ref, atol=atol, rtol=atol, err_msg=f"d{name}"
        )


@settings(max_examples=6, deadline=None)
@given(problems())
def test_xla_matches_float64_reference_with_grads(problem: Problem) -> None:
    with jax.enable_x64(True):
        check_against_reference(problem, "xla", jnp.float64, atol=1e-10)


@settings(max_examples=4, deadline=None)
@given(problems())
def test_xla_float32_matches_float64_reference(problem: Problem) -> None:
    check_against_reference(problem, "xla", jnp.float32, atol=2e-5)


@pytest.mark.parametrize("rows_per_chunk", [1, 3])
@settings(max_examples=3, deadline=None)
@given(problem=problems())
def test_xla_chunked_rows_match_float64_reference(problem: Problem, rows_per_chunk: int) -> None:
    """Chunks of 1 and 3 rows, padded up to a multiple of the chunk (3 rarely divides the rows,
    so padding rows are exercised): the `lax.map` forward and `lax.scan` backward agree with
    the reference."""

    def plan(num_rows, _):
        chunk = min(num_rows, rows_per_chunk)
        return chunk, -(-num_rows // chunk) * chunk

    with mock.patch.object(xla, "chunk_plan", plan), jax.enable_x64(True):
        check_against_reference(problem, "xla", jnp.float64, atol=1e-10)


def test_xla_chunk_plan_prefers_a_divisor_near_the_budget() -> None:
    """Rows per chunk: a divisor of the rows above half the budget (no padded copy of q), else
    the budget with padding rows."""
    row_bytes = xla.CHUNK_BYTES // 12  # a budget of 12 rows
    assert xla.chunk_plan(512, row_bytes) == (8, 512)
    assert xla.chunk_plan(120, row_bytes) == (12, 120)
    assert xla.chunk_plan(127, row_bytes) == (12, 132)  # 127 is prime
    assert xla.chunk_plan(5, row_bytes) == (5, 5)
    assert xla.chunk_plan(3, xla.CHUNK_BYTES * 4) == (1, 3)


def test_reference_matches_dense_softmax_without_masks() -> None:
    """With every block visited and no options, the reference is textbook attention."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 8, 2, 4)) for _ in range(3))
    with jax.enable_x64(True):
        out = block_sparse_attention_reference(
            q, k, v, np.ones((1, 1, 2, 2), bool), block_q=4, block_kv=4
        )
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(out, np.einsum("bhqk,bkhd->bqhd", probs, v), atol=1e-12)


def test_dense_mask_aligns_positions_at_the_end() -> None:
    """2 queries after 4 keys: query i sits at position i + 2 under causal and window."""
    full = np.ones((1, 1, 1, 1), bool)
    causal = dense_mask(full, 2, 4, block_q=2, block_kv=4, causal=True)[0, 0]
    np.testing.assert_array_equal(causal, [[1, 1, 1, 0], [1, 1, 1, 1]])
    window = dense_mask(full, 2, 4, block_q=2, block_kv=4, window=2)[0, 0]
    np.testing.assert_array_equal(window, [[0, 1, 1, 0], [0, 0, 1, 1]])


@pytest.mark.parametrize("impl", ["xla", "interpret_gpu"])
def test_fully_masked_rows_give_zeros_and_finite_grads(impl: str) -> None:
    """A query block with no visited block, and rows emptied by the element mask."""
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 16, 2, 8)), jnp.float32) for _ in range(3))
    block_mask = np.array([[[[True, False], [False, False]]]])  # query block 1 sees nothing
    element_mask = np.ones((1, 1, 16, 16), bool)
    element_mask[0, 0, 3] = False  # row 3 of query block 0 sees nothing either
    fn = lambda q, k, v: block_sparse_attention(
        q, k, v, block_mask, block_q=8, block_kv=8, element_mask=element_mask, impl=impl
    )
    out = fn(q, k, v)
    np.testing.assert_array_equal(out[0, 8:], 0.0)
    np.testing.assert_array_equal(out[0, 3], 0.0)
    assert np.all(np.abs(np.asarray(out[0, :3])) > 0)
    _, grads = loss_and_grads(fn, q, k, v)
    chex.assert_tree_all_finite(grads)
    np.testing.assert_array_equal(grads[0][0, 8:], 0.0)  # dq of empty rows
    np.testing.assert_array_equal(grads[1][0, 8:], 0.0)  # keys nobody visits


def _top_k_block_mask(q, k, *, block_q: int, block_kv: int, top_k: int) -> jax.Array:
    """MoBA-style routing: each query block keeps the top_k kv blocks by mean-key affinity."""
    batch, q_len, heads, d = q.shape
    q_mean = q.reshape(batch, q_len // block_q, block_q, heads, d).mean(2)
    k_mean = k.reshape(batch, k.shape[1] // block_kv, block_kv, heads, d).mean(2)
    scores = jnp.einsum("bihd,bjhd->bhij", q_mean, k_mean)  # [batch, heads, q_blocks, kv_blocks]
    _, chosen = jax.lax.top_k(scores, top_k)
    return jnp.any(jax.nn.one_hot(chosen, scores.shape[-1], dtype=bool), axis=-2)


@pytest.mark.parametrize("impl", ["xla", "interpret_gpu"])
def test_dynamic_top_k_mask_under_jit_matches_reference(impl: str) -> None:
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 32, 2, 8)), jnp.float32) for _ in range(3))

    @jax.jit
    def sparse(q, k, v):
        block_mask = _top_k_block_mask(q, k, block_q=8, block_kv=8, top_k=2)
        out = block_sparse_attention(
            q, k, v, block_mask, block_q=8, block_kv=8, max_kv_blocks=2, causal=True, impl=impl
        )
        return out, block_mask

    out, block_mask = sparse(q, k, v)
    assert int(np.asarray(block_mask).sum(-1).max()) == 2
    with jax.enable_x64(True):
        ref = block_sparse_attention_reference(
            *(np.asarray(x, np.float64) for x in (q, k, v)),
            np.asarray(block_mask),
            block_q=8,
            block_kv=8,
            causal=True,
        )
    np.testing.assert_allclose(out, ref, atol=2e-5)


def test_visit_lists_are_sorted_and_padded_with_the_last_index() -> None:
    block_mask = jnp.asarray([[[[0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0]]]], bool)
    visits = mask_info.visit_lists(block_mask, 3)
    np.testing.assert_array_equal(visits.counts[0, 0], [2, 0, 3])
    np.testing.assert_array_equal(visits.indices[0, 0], [[1, 3, 3], [0, 0, 0], [0, 1, 2]])
    assert mask_info.static_max_visits(np.asarray(block_mask)) == 3
    assert jax.jit(lambda m: jnp.int32(mask_info.static_max_visits(m) is None))(block_mask)


def _temp_bytes(q_len: int, window_blocks: int) -> int:
    """Compiled scratch memory of forward+backward of a sliding-window mask on the XLA path."""
    blocks = q_len // 64
    i = np.arange(blocks)
    block_mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window_blocks)
    shape = jax.ShapeDtypeStruct((1, q_len, 2, 32), jnp.float32)
    loss = lambda q, k, v: jnp.sum(
        block_sparse_attention(
            q, k, v, block_mask[None, None], block_q=64, block_kv=64, causal=True, impl="xla"
        )
    )
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(shape, shape, shape).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_xla_path_memory_is_linear_in_length() -> None:
    """Doubling the length of a sliding-window problem about doubles its memory (not x4)."""
    small, large = _temp_bytes(1024, 2), _temp_bytes(2048, 2)
    assert large < 2.5 * small, (small, large)


def test_max_kv_blocks_below_a_concrete_masks_need_is_an_error() -> None:
    q = np.zeros((1, 8, 1, 4), np.float32)
    with pytest.raises(ValueError, match="max_kv_blocks"):
        block_sparse_attention(
            q, q, q, np.ones((1, 1, 2, 2), bool), block_q=4, block_kv=4, max_kv_blocks=1
        )


def _call(**changes):
    args = dict(
        q=np.zeros((1, 8, 2, 4), np.float32),
        k=np.zeros((1, 8, 1, 4), np.float32),
        v=np.zeros((1, 8, 1, 4), np.float32),
        block_mask=np.ones((1, 1, 2, 2), bool),
        block_q=4,
        block_kv=4,
    )
    args.update(changes)
    return block_sparse_attention(**args)


@pytest.mark.parametrize(
    ("changes", "name"),
    [
        (dict(block_q=3), "block_q.*not divisible"),
        (dict(block_kv=5), "block_kv.*not divisible"),
        (dict(block_q=0), "block_q"),
        (
            dict(
                q=np.zeros((1, 8, 3, 4), np.float32),
                k=np.zeros((1, 8, 2, 4), np.float32),
                v=np.zeros((1, 8, 2, 4), np.float32),
            ),
            "k: heads=3",
        ),
        (dict(q=np.zeros((8, 2, 4), np.float32)), "q: expected"),
        (dict(v=np.zeros((1, 4, 1, 4), np.float32)), "v: shape"),
        (dict(k=np.zeros((1, 8, 1, 4), np.float16)), "k, v: dtypes"),
        (dict(block_mask=np.ones((1, 1, 2, 3), bool)), "block_mask: expected shape"),
        (dict(block_mask=np.ones((1, 3, 2, 2), bool)), "block_mask: expected shape"),
        (dict(block_mask=np.ones((1, 1, 2, 2), np.int32)), "block_mask: dtype"),
        (dict(element_mask=np.ones((1, 1, 8, 4), bool)), "element_mask: expected shape"),
        (dict(q_segment_ids=np.zeros((1, 8), np.int32)), "give both or neither"),
        (
            dict(
                q_segment_ids=np.zeros((1, 8), np.int32), kv_segment_ids=np.zeros((1, 7), np.int32)
            ),
            "kv_segment_ids: expected shape",
        ),
        (dict(window=0), "window"),
        (dict(scale=-1.0), "scale"),
        (dict(logit_soft_cap=0.0), "logit_soft_cap"),
        (dict(max_kv_blocks=0), "max_kv_blocks"),
        (dict(causal=1), "causal"),
        (dict(impl="cuda"), "impl: unknown"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(changes: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        _call(**changes)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU refusal")
def test_pallas_on_cpu_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="impl: 'pallas'"):
        _call(impl="pallas")
