"""Kernel benchmarks on whatever backend is present, printed as tables of ratios.

    python benchmarks/kernels.py [--repeats 5] [--quick] [--part all|gmm|attention]

CPU: `kernels_pallas.gmm(impl="auto")` against `jax.lax.ragged_dot` (float32, m=4096,
k=n=512, 8 and 64 groups), and `block_sparse_attention(impl="auto")` against dense masked
attention (`jax.nn.dot_product_attention` with the equivalent [q_len, kv_len] mask) at several
block densities, length 4096, blocks of 128, forward and forward+backward.

GPU: gmm TFLOP/s (bfloat16, m=16384, k=n=4096, 8 and 64 groups) against a dense bf16 matmul of
the same FLOPs and against ragged_dot; block-sparse attention at densities 100%, 50%, 25%,
12.5% (sequence 8192, 16 heads, head_dim 128, bf16) against `jax.nn.dot_product_attention(
implementation="cudnn")` doing full (unmasked) attention of the same shape, forward and
forward+backward. Where cuDNN refuses the shape or dtype (or the installed cuDNN is too old), the
script says why and times `implementation="xla"` with the masked problem instead; the table's
title names the implementation that ran.

Block masks keep the diagonal block (no empty rows) plus random other blocks, the same number
in every query block row. Group sizes are a multinomial draw over Dirichlet(5) expert loads.
Times are medians over `--repeats` runs after a compile-and-warm-up run; every ratio compares
two rows measured in this one run. The attention table also gives each pass's time over its
time at the largest density (time against density), and one sentence gives the ratio at the
largest density against the dense implementation (on GPU, at 100%: block-sparse against flash
attention). `--quick` shrinks the shapes (a smoke test); `--part` runs one table. Each table
ends with a `summary: ...` line of its key numbers, for scripts/accelerator_check.sh.
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


def bench_gmm(cases, dtype, repeats: int, on_gpu: bool) -> str:
    """Prints the gmm table; returns its key numbers in one line."""
    rng = np.random.default_rng(0)
    rows, key_numbers = [], []
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
        speed = f"{tflops(t_ours)} TFLOP/s" if on_gpu else f"{t_ours:.2f} ms"
        key_numbers.append(
            f"g={groups} auto {speed}, {t_dense / t_ours:.2f}x dense's speed, "
            f"{t_ragged / t_ours:.2f}x ragged_dot's"
        )
    header = ("case", "gmm auto ms", "ragged_dot ms", "dense ms", "ragged/auto", "dense/auto")
    if on_gpu:
        header += ("auto TFLOP/s", "dense TFLOP/s")
    print_table(f"gmm forward, {jnp.dtype(dtype).name}", header, rows)
    return "; ".join(key_numbers)


def sparse_block_mask(blocks: int, per_row: int, rng: np.random.Generator) -> np.ndarray:
    """[1, 1, blocks, blocks] bool: the diagonal plus `per_row - 1` random others per row."""
    mask = np.eye(blocks, dtype=bool)
    for row in range(blocks):
        others = rng.permutation(np.delete(np.arange(blocks), row))[: per_row - 1]
        mask[row, others] = True
    return mask[None, None]


def bench_attention(length, heads, head_dim, block, densities, dtype, repeats, dense_impl) -> str:
    """Prints the time-against-density table; returns its key numbers in one line."""
    rng = np.random.default_rng(1)
    shape = (1, length, heads, head_dim)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))
    blocks = length // block
    dense_name = "cuDNN flash attention" if dense_impl == "cudnn" else "XLA masked attention"
    times = {}  # (density, pass) -> (sparse ms, dense ms)
    # Densities that round to the same blocks per row (short sequences) are timed once.
    for per_row in dict.fromkeys(max(1, round(density * blocks)) for density in densities):
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
            times[per_row / blocks, phase] = (t_sparse, t_dense)
    densest = max(density for density, _ in times)
    rows = [
        (f"{density:.1%}", phase, f"{t_sparse:.2f}", f"{t_dense:.2f}",
         f"{t_dense / t_sparse:.2f}x", f"{t_sparse / times[densest, phase][0]:.2f}")
        for (density, phase), (t_sparse, t_dense) in times.items()
    ]  # fmt: skip
    title = (
        f"block_sparse_attention(impl='auto') vs dense dot_product_attention"
        f"(implementation={dense_impl!r}), length {length}, heads {heads}, head_dim {head_dim},"
        f" block {block}, {jnp.dtype(dtype).name}"
    )
    header = ("block density", "pass", "sparse ms", "dense ms", "dense/sparse",
              f"sparse vs {densest:.0%}")  # fmt: skip
    print_table(title, header, rows)
    at_densest = {phase: sparse / dense for (d, phase), (sparse, dense) in times.items()
                  if d == densest}  # fmt: skip
    print(
        f"At {densest:.0%} density block_sparse_attention takes {at_densest['fwd']:.2f}x "
        f"(forward) and {at_densest['fwd+bwd']:.2f}x (forward+backward) the time of {dense_name}."
    )
    curve = ", ".join(
        f"{density:.1%} {t_sparse / times[densest, phase][0]:.2f}"
        for (density, phase), (t_sparse, _) in times.items()
        if phase == "fwd+bwd" and density != densest
    )
    return (
        f"fwd+bwd time vs {densest:.0%} density: {curve}; at {densest:.0%}: "
        f"{at_densest['fwd']:.2f}x / {at_densest['fwd+bwd']:.2f}x (fwd / fwd+bwd) the time of "
        f"{dense_name}"
    )


def dense_attention_impl(shape: tuple[int, ...], dtype) -> str:
    """ "cudnn" if cuDNN flash attention runs this shape and dtype, forward and backward;
    else "xla", saying why."""
    q = jnp.zeros(shape, dtype)
    cudnn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    try:
        jax.block_until_ready(jax.jit(cudnn)(q, q, q))
        jax.block_until_ready(jax.jit(_with_grads(cudnn))(q, q, q))
    # cuDNN refuses with ValueError or NotImplementedError when tracing (shape, dtype, cuDNN
    # version) and with a JaxRuntimeError (a RuntimeError) when compiling or running.
    except (ValueError, NotImplementedError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(f"\ncuDNN attention refused ({type(error).__name__}: {reason[:300]});")
        print("the dense rows fall back to implementation='xla' (masked, materialised logits).")
        return "xla"
    return "cudnn"


def _with_grads(fn: Callable) -> Callable:
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small shapes, a smoke test")
    parser.add_argument(
        "--part", choices=("all", "gmm", "attention"), default="all", help="which table to run"
    )
    args = parser.parse_args()
    backend = jax.default_backend()
    print(f"backend {backend}: {jax.devices()[0].device_kind}; {platform.processor() or ''}")
    on_gpu = backend == "gpu"
    if on_gpu:
        m, kn = (2048, 1024) if args.quick else (16384, 4096)
        gmm_cases = ((m, kn, kn, 8), (m, kn, kn, 64))
        gmm_dtype = attention_dtype = jnp.bfloat16
        length, heads, head_dim = (2048 if args.quick else 8192), 16, 128
        densities = (1.0, 0.5, 0.25, 0.125)
    else:
        m, kn = (1024, 256) if args.quick else (4096, 512)
        gmm_cases = ((m, kn, kn, 8), (m, kn, kn, 64))
        gmm_dtype = attention_dtype = jnp.float32
        length, heads, head_dim = (1024 if args.quick else 4096), 4, 64
        densities = (0.5, 0.25, 0.125, 1 / 32)
    if args.part in ("all", "gmm"):
        print("summary: " + bench_gmm(gmm_cases, gmm_dtype, args.repeats, on_gpu=on_gpu))
    if args.part in ("all", "attention"):
        shape = (1, length, heads, head_dim)
        dense_impl = dense_attention_impl(shape, attention_dtype) if on_gpu else "xla"
        summary = bench_attention(
            length, heads, head_dim, 128, densities, attention_dtype, args.repeats, dense_impl
        )
        print("summary: " + summary)


if __name__ == "__main__":
    main()
