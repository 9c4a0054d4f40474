"""Kernel benchmarks on whatever backend is present, printed as tables of ratios.

    python benchmarks/kernels.py [--repeats 5] [--quick]

CPU: `kernels_pallas.gmm(impl="auto")` against `jax.lax.ragged_dot` (float32, m=4096,
k=n=512, 8 and 64 groups), and `block_sparse_attention(impl="auto")` against dense masked
attention (`jax.nn.dot_product_attention` with the equivalent [q_len, kv_len] mask) at several
block densities, length 4096, blocks of 128, forward and forward+backward.

GPU: gmm TFLOP/s (bfloat16, m=16384, k=n=4096, 8 and 64 groups) against a dense bf16 matmul of
the same FLOPs and against ragged_dot; block-sparse attention at densities 100%, 50%, 25%,
12.5% (sequence 8192, 16 heads, head_dim 128, bf16) against `jax.nn.dot_product_attention(
implementation="cudnn")` doing full (unmasked) attention of the same shape, forward and
forward+backward.

Block masks keep the diagonal block (no empty rows) plus random other blocks, the same number
in every query block row. Group sizes are a multinomial draw over Dirichlet(5) expert loads.
Times are medians over `--repeats` runs after a compile-and-warm-up run; every ratio compares
two rows measured in this one run. `--quick` shrinks the shapes (a smoke test).
"""

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import block_sparse_attention, gmm


def median_ms(fn: Callable[..., object], *args: object, repeats: int) -> float:
    """Median wall time of `fn(*args)` in milliseconds, after one untimed compile-and-run."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def print_table(title: str, header: tuple[str, ...], rows: list[tuple]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths, strict=True)))


def group_sizes(m: int, groups: int, rng: np.random.Generator) -> jax.Array:
    loads = rng.dirichlet(np.full(groups, 5.0))
    return jnp.asarray(rng.multinomial(m, loads), jnp.int32)


def bench_gmm(cases, dtype, repeats: int, on_gpu: bool) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for m, k, n, groups in cases:
        lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
        rhs = jnp.asarray(rng.standard_normal((groups, k, n)) / np.sqrt(k), dtype)
        sizes = group_sizes(m, groups, rng)
        ours = jax.jit(lambda a, b, s: gmm(a, b, s, impl="auto"))
        ragged = jax.jit(lambda a, b, s: jax.lax.ragged_dot(a, b, s))
        dense = jax.jit(lambda a, b: a @ b)
        flops = 2 * m * k * n
        t_ours = median_ms(ours, lhs, rhs, sizes, repeats=repeats)
        t_ragged = median_ms(ragged, lhs, rhs, sizes, repeats=repeats)
        t_dense = median_ms(dense, lhs, rhs[0], repeats=repeats)
        tflops = lambda ms, flops=flops: f"{flops / ms / 1e9:.1f}"
        row = (f"m={m} k={k} n={n} g={groups}", f"{t_ours:.2f}", f"{t_ragged:.2f}")
        row += (f"{t_dense:.2f}", f"{t_ragged / t_ours:.2f}x", f"{t_dense / t_ours:.2f}x")
        rows.append(row + ((tflops(t_ours), tflops(t_dense)) if on_gpu else ()))
    header = ("case", "gmm auto ms", "ragged_dot ms", "dense ms", "ragged/auto", "dense/auto")
    if on_gpu:
        header += ("auto TFLOP/s", "dense TFLOP/s")
    print_table(f"gmm forward, {jnp.dtype(dtype).name}", header, rows)


def sparse_block_mask(blocks: int, per_row: int, rng: np.random.Generator) -> np.ndarray:
    """[1, 1, blocks, blocks] bool: the diagonal plus `per_row - 1` random others per row."""
    mask = np.eye(blocks, dtype=bool)
    for row in range(blocks):
        others = rng.permutation(np.delete(np.arange(blocks), row))[: per_row - 1]
        mask[row, others] = True
    return mask[None, None]


def bench_attention(length, heads, head_dim, block, densities, dtype, repeats, dense_impl):
    rng = np.random.default_rng(1)
    shape = (1, length, heads, head_dim)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))
    blocks = length // block
    rows = []
    for density in densities:
        per_row = max(1, round(density * blocks))
        block_mask = sparse_block_mask(blocks, per_row, rng)
        dense_mask = jnp.asarray(np.kron(block_mask[0, 0], np.ones((block, block), bool)))

        def sparse(q, k, v, block_mask=block_mask):
            return block_sparse_attention(q, k, v, block_mask, block_q=block, block_kv=block)

        def dense(q, k, v, dense_mask=dense_mask):
            # cuDNN's cost does not fall with the mask's density: time it as full attention
            # (the mask would only add a bias read); XLA gets the same masked problem.
            mask = None if dense_impl == "cudnn" else dense_mask[None, None]
            return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=dense_impl)

        for phase, wrap in (("fwd", lambda f: f), ("fwd+bwd", _with_grads)):
            t_sparse = median_ms(jax.jit(wrap(sparse)), q, k, v, repeats=repeats)
            t_dense = median_ms(jax.jit(wrap(dense)), q, k, v, repeats=repeats)
            rows.append(
                (f"{per_row / blocks:.1%}", phase, f"{t_sparse:.2f}", f"{t_dense:.2f}",
                 f"{t_dense / t_sparse:.2f}x")
            )  # fmt: skip
    title = (
        f"block_sparse_attention(impl='auto') vs dense dot_product_attention"
        f"(implementation={dense_impl!r}), length {length}, heads {heads}, head_dim {head_dim},"
        f" block {block}, {jnp.dtype(dtype).name}"
    )
    header = ("block density", "pass", "sparse ms", "dense ms", "dense/sparse")
    print_table(title, header, rows)


def _with_grads(fn: Callable) -> Callable:
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small shapes, a smoke test")
    args = parser.parse_args()
    backend = jax.default_backend()
    print(f"backend {backend}: {jax.devices()[0].device_kind}; {platform.processor() or ''}")
    on_gpu = backend == "gpu"
    if on_gpu:
        m, kn = (2048, 1024) if args.quick else (16384, 4096)
        gmm_cases = ((m, kn, kn, 8), (m, kn, kn, 64))
        bench_gmm(gmm_cases, jnp.bfloat16, args.repeats, on_gpu=True)
        length = 2048 if args.quick else 8192
        bench_attention(
            length, 16, 128, 128, (1.0, 0.5, 0.25, 0.125), jnp.bfloat16, args.repeats, "cudnn"
        )
        return
    m, kn = (1024, 256) if args.quick else (4096, 512)
    bench_gmm(((m, kn, kn, 8), (m, kn, kn, 64)), jnp.float32, args.repeats, on_gpu=False)
    length = 1024 if args.quick else 4096
    bench_attention(length, 4, 64, 128, (0.5, 0.25, 0.125, 1 / 32), jnp.float32, args.repeats,
                    "xla")  # fmt: skip


if __name__ == "__main__":
    main()
