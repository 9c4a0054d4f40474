"""The Pallas kernels of block_sparse_attention: interpreted on CPU, compiled on accelerators.

References: the dense float64 reference, and JAX's own splash attention (interpreted) as an
independent implementation. Interpret modes fill outputs with NaN before the kernel runs (the
generic interpreter always, the TPU one with `uninitialized_memory="nan"`), so an output tile
a kernel forgets to write fails the finiteness checks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from test_block_sparse_attention import Problem, check_against_reference, problems

from kernels_pallas import block_sparse_attention
from kernels_pallas.block_sparse_attention import tpu


@settings(max_examples=4, deadline=None)
@given(problems(max_blocks=2))
def test_gpu_kernel_interpreted_matches_float64_reference_with_grads(problem: Problem) -> None:
    check_against_reference(problem, "interpret_gpu", jnp.float32, atol=2e-5)


def test_tpu_kernel_interpreted_with_bounds_and_uninitialised_memory_checks() -> None:
    """Every option at once, GQA and a broadcast mask, under the checking TPU interpreter."""
    assert isinstance(tpu.INTERPRET_PARAMS, pltpu.InterpretParams)
    assert tpu.INTERPRET_PARAMS.out_of_bounds_reads == "raise"
    assert tpu.INTERPRET_PARAMS.uninitialized_memory == "nan"
    problem = Problem(
        batch=1, q_blocks=2, kv_blocks=3, heads=2, kv_heads=1, head_dim=8, block_q=8,
        block_kv=8, density=0.6, mask_batch=1, mask_heads=2, causal=True, window=14,
        segments=True, element=True, soft_cap=1.5, scale=None, seed=5,
    )  # fmt: skip
    check_against_reference(problem, "interpret_tpu", jnp.float32, atol=2e-5)


def _splash_inputs(seed: int):
    rng = np.random.default_rng(seed)
    heads, length, head_dim, block = 2, 256, 64, 128
    q, k, v = (rng.standard_normal((heads, length, head_dim)).astype(np.float32) for _ in "qkv")
    # A static pattern per head: head 0 causal, head 1 a block-diagonal plus first-block mask.
    rows = np.arange(length)
    causal = rows[:, None] >= rows[None, :]
    local = (rows[:, None] // block == rows[None, :] // block) | (rows[None, :] < block)
    dense = np.stack([causal, local])  # [heads, q_len, kv_len]
    blocks = dense.reshape(heads, 2, block, 2, block).any(axis=(2, 4))
    return q, k, v, dense, blocks, block


@pytest.mark.parametrize("impl", ["xla", "interpret_gpu"])
def test_matches_splash_attention_interpreted(impl: str) -> None:
    q, k, v, dense, blocks, block = _splash_inputs(7)
    sizes = splash.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block,
    )  # fmt: skip
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([splash.NumpyMask(m) for m in dense]),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=True,
    )
    scale = q.shape[-1] ** -0.5
    expected = kernel(q * scale, k, v)  # splash leaves scaling to the caller
    # Our layout is [batch, length, heads, head_dim]; splash's [heads, length, head_dim].
    to_ours = lambda x: jnp.asarray(x).transpose(1, 0, 2)[None]
    out = block_sparse_attention(
        to_ours(q), to_ours(k), to_ours(v), blocks[None], block_q=block, block_kv=block,
        element_mask=dense[None], impl=impl,
    )  # fmt: skip
    np.testing.assert_allclose(out[0].transpose(1, 0, 2), expected, atol=2e-5, rtol=2e-5)


@pytest.mark.accelerator
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_kernel_matches_reference(dtype) -> None:
    problem = Problem(
        batch=2, q_blocks=4, kv_blocks=4, heads=4, kv_heads=2, head_dim=128, block_q=128,
        block_kv=128, density=0.5, mask_batch=1, mask_heads=4, causal=True, window=None,
        segments=True, element=False, soft_cap=None, scale=None, seed=11,
    )  # fmt: skip
    atol = 2e-2 if dtype == jnp.bfloat16 else 2e-3
    check_against_reference(problem, "pallas", dtype, atol=atol)


@pytest.mark.accelerator
def test_auto_picks_the_compiled_kernel_on_accelerators() -> None:
    from kernels_pallas.block_sparse_attention import resolve_impl

    assert resolve_impl("auto") == f"{jax.default_backend()}:compiled"
