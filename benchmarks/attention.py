"""Forward+backward time of causal attention against sequence length on CPU: dense, sliding
window and MoBA.

    nice -n 10 python benchmarks/attention.py [--lengths 1024 2048 4096 8192 16384] [--repeats 3]

Batch 1, `--heads` heads of dimension 64, float32. Each path is jitted as the gradient of
`sum(out * cotangent)` with respect to q, k and v:
  dense:   `moejax.attention.causal_attention` (materialises [length, length] logits);
  window:  `kernels_pallas.block_sparse_attention(impl="xla")` with the exact sliding-window
           pattern of `--window` tokens on 64-token blocks;
  moba:    `moba_select` routing (top-3 of 64-token blocks, own block added) plus the same op;
  moba9:   the same with top-8, i.e. 9 visited blocks, as many as the window path visits (a
           512-token window on 64-token blocks touches 9 blocks), to compare like with like;
  moba_attn: moba's attention alone, on the blocks its routing picked for the same q and k
           (routing scores every kv block per query block: quadratic in blocks, small here).
Times are minima over `--repeats` rounds, in which every length of a path runs in turn, an
untimed call and then a timed one (a burst of other work then hits the lengths of a round
alike), after a compile-and-run. The minimum is the least disturbed by other work on a shared
machine (medians once made the window path look 2-17x slower than moba, more than its 9 vs 4
blocks explain). "x/doubling" is the ratio to the previous length (a linear path doubles, a
quadratic one quadruples). Peak memory is the compiled executable's `memory_analysis()`
(arguments + outputs + temporaries) at each length.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import kernels_pallas
from moejax.attention import causal_attention
from moejax.sparse_attention import masks
from moejax.sparse_attention.moba import moba_select

BLOCK = 64


def dense(q, k, v, window, top_k):
    return causal_attention(q, k, v)


def sliding(q, k, v, window, top_k):
    pattern = masks.sliding_window(q.shape[1], BLOCK, BLOCK, window)
    return kernels_pallas.block_sparse_attention(
        q,
        k,
        v,
        pattern.block_mask[None, None],
        block_q=BLOCK,
        block_kv=BLOCK,
        causal=True,
        window=window,
        max_kv_blocks=pattern.max_kv_blocks,
        impl="xla",
    )


def moba(q, k, v, window, top_k):
    selection = moba_select(q, k, block_q=BLOCK, block_kv=BLOCK, top_k=top_k)
    return kernels_pallas.block_sparse_attention(
        q,
        k,
        v,
        selection.block_mask,
        block_q=BLOCK,
        block_kv=BLOCK,
        causal=True,
        max_kv_blocks=top_k + 1,
        impl="xla",
    )


def moba9(q, k, v, window, top_k):
    return moba(q, k, v, window, 8)


def moba_fixed(q, k, v, window, top_k, *, block_mask):
    """MoBA's attention alone: the blocks its routing picks for these q and k, chosen outside
    the timed function (MoBA scores every kv block per query block, quadratic in blocks)."""
    return kernels_pallas.block_sparse_attention(
        q,
        k,
        v,
        block_mask,
        block_q=BLOCK,
        block_kv=BLOCK,
        causal=True,
        max_kv_blocks=top_k + 1,
        impl="xla",
    )


PATHS = {"dense": dense, "window": sliding, "moba": moba, "moba9": moba9, "moba_attn": moba_fixed}


def fwd_bwd(path, window: int, top_k: int):
    def loss(q, k, v, cotangent):
        return jnp.sum(path(q, k, v, window, top_k) * cotangent)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def compile_at(path, length: int, heads: int, window: int, top_k: int):
    """The compiled forward+backward of `path` at `length`, its arguments and peak bytes."""
    keys = jax.random.split(jax.random.key(length), 4)
    shape = (1, length, heads, 64)
    args = tuple(jax.random.normal(key, shape, jnp.float32) for key in keys)
    if path is moba_fixed:
        routed = jax.jit(lambda q, k: moba_select(q, k, block_q=BLOCK, block_kv=BLOCK, top_k=top_k))
        path = functools.partial(moba_fixed, block_mask=np.asarray(routed(*args[:2]).block_mask))
    compiled = fwd_bwd(path, window, top_k).lower(*args).compile()
    stats = compiled.memory_analysis()
    peak = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    jax.block_until_ready(compiled(*args))
    return compiled, args, peak


def measure(path, lengths, heads: int, window: int, top_k: int, repeats: int):
    """{length: (best seconds, peak bytes)}. The lengths take turns within each of `repeats`
    rounds, so a burst of other work on the machine slows every length of the round alike
    instead of one length's whole series: the doubling ratios are what this benchmark is for."""
    runs = {n: compile_at(path, n, heads, window, top_k) for n in lengths}
    best = dict.fromkeys(lengths, float("inf"))
    for _ in range(repeats):
        for n, (compiled, args, _) in runs.items():
            # Untimed first: a call right after another length's pays for the switch (dense at
            # 1k took 77 ms instead of 33 after a dense 16k call, which frees 6 GiB).
            jax.block_until_ready(compiled(*args))
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            best[n] = min(best[n], time.perf_counter() - start)
    return {n: (best[n], runs[n][2]) for n in lengths}


def growth_exponent(timings: dict[int, tuple[float, int]], last: int | None = None) -> float:
    """Least-squares slope of log(time) against log(length): 1 for a linear path, 2 for a
    quadratic one. Less sensitive than single doublings to one step that falls out of a cache."""
    lengths = sorted(timings)[-last:] if last else sorted(timings)
    x = np.log([float(n) for n in lengths])
    y = np.log([timings[n][0] for n in lengths])
    return float(np.polyfit(x, y, 1)[0]) if len(lengths) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    args = parser.parse_args()
    print(f"backend {jax.default_backend()}, batch 1, heads {args.heads}, head_dim 64, float32")
    results = {}
    paths = {name: PATHS[name] for name in args.paths}
    for name, path in paths.items():
        results[name] = measure(
            path, args.lengths, args.heads, args.window, args.top_k, args.repeats
        )
        print(f"measured {name}", flush=True)
    header = f"{'length':>7} | " + " | ".join(f"{name:>8} ms  x/doubling  MiB" for name in paths)
    print(header)
    for length in args.lengths:
        cells = []
        for name in paths:
            seconds, peak = results[name][length]
            previous = results[name].get(length // 2)
            ratio = f"{seconds / previous[0]:10.2f}" if previous else f"{'-':>10}"
            cells.append(f"{seconds * 1e3:11.1f} {ratio} {peak / 2**20:6.0f}")
        print(f"{length:>7} | " + " | ".join(cells), flush=True)
    for name in paths:
        print(
            f"{name}: time grows as length^{growth_exponent(results[name]):.2f} (fit over all "
            f"lengths), length^{growth_exponent(results[name], last=3):.2f} over the last three"
        )
    if "dense" in paths:
        for name in [name for name in paths if name != "dense"]:
            faster = [n for n in args.lengths if results[name][n][0] < results["dense"][n][0]]
            print(f"{name}: faster than dense from length {min(faster) if faster else None}")


if __name__ == "__main__":
    main()
