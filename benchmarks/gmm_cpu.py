"""Grouped matmul on CPU: dense matmul vs `ragged_dot` vs "xla_tiled", and a dropless MoE layer.

    python benchmarks/gmm_cpu.py [--repeats 7]

Each case times, jitted in float32, the forward pass and the forward plus backward pass (the
gradient wrt both operands) of a dense [m, k] @ [k, n] matmul with the same useful FLOPs, of
`kernels_pallas.gmm(impl="xla")` (`jax.lax.ragged_dot`) and of `impl="xla_tiled"`. Group sizes are
a multinomial draw over expert loads from a Dirichlet(5) distribution, so experts are unevenly
loaded as in a trained router. A second table times `moejax.moe.moe_ffn(strategy="dropless")`
with each implementation next to a dense SwiGLU doing the same active FLOPs. Times are medians
over `--repeats` runs after a warm-up run; ratios are against the dense row of the same case,
measured in the same run of this script.
"""

import argparse
import functools
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import gmm
from kernels_pallas.grouped_matmul.xla_tiled import default_tile_m
from moejax.moe import DroplessOptions, init_expert_params, moe_ffn, swiglu
from moejax.routers.base import Routing
from moejax.routers.softmax_top_k import softmax_top_k

# (m, k, n, num_groups)
GMM_CASES = ((8192, 128, 256, 4), (8192, 512, 1024, 8), (32768, 512, 128, 64))
# (tokens, d_model, d_ff, num_experts, top_k)
MOE_CASES = ((4096, 128, 256, 4, 2),)


def median_ms(fn: Callable[..., object], *args: object, repeats: int) -> float:
    """Median wall time of `fn(*args)` in milliseconds, after one untimed compile-and-run."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def forward_and_backward(fn: Callable[..., jax.Array]) -> Callable[..., object]:
    """jit of the output and the gradient wrt the first two arguments of sum(fn(...) * cot)."""

    def loss(lhs: jax.Array, rhs: jax.Array, *rest: jax.Array) -> jax.Array:
        *args, cotangent = rest
        return jnp.sum(fn(lhs, rhs, *args) * cotangent)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def random_group_sizes(rng: np.random.Generator, m: int, num_groups: int) -> np.ndarray:
    """[num_groups] int32 summing to m, unevenly loaded: multinomial over Dirichlet(5) loads."""
    loads = rng.dirichlet(np.full(num_groups, 5.0))
    return rng.multinomial(m, loads).astype(np.int32)


Row = tuple[str, str, float, float, float, float]
Candidates = dict[str, tuple[Callable[..., jax.Array], tuple]]


def time_rows(case: str, candidates: Candidates, cotangent: jax.Array, repeats: int) -> list[Row]:
    """(case, name, fwd ms, fwd ratio, fwd+bwd ms, fwd+bwd ratio), ratios to the first entry."""
    rows, first = [], None
    for name, (fn, args) in candidates.items():
        forward = median_ms(jax.jit(fn), *args, repeats=repeats)
        both = median_ms(forward_and_backward(fn), *args, cotangent, repeats=repeats)
        first = first or (forward, both)
        rows.append((case, name, forward, forward / first[0], both, both / first[1]))
    return rows


def gmm_rows(repeats: int) -> list[Row]:
    """A dense matmul of the same useful size, then ragged_dot and xla_tiled, per case."""
    rows = []
    for m, k, n, num_groups in GMM_CASES:
        rng = np.random.default_rng(0)
        lhs = jnp.asarray(rng.standard_normal((m, k), np.float32))
        rhs = jnp.asarray(rng.standard_normal((num_groups, k, n), np.float32) / np.sqrt(k))
        group_sizes = jnp.asarray(random_group_sizes(rng, m, num_groups))
        cotangent = jnp.asarray(rng.standard_normal((m, n), np.float32))
        tile_m = default_tile_m(m, num_groups)
        candidates: Candidates = {
            "dense [m,k]@[k,n]": (lambda a, b: a @ b, (lhs, rhs[0])),
            "ragged_dot (xla)": (
                lambda a, b, g: gmm(a, b, g, impl="xla"),
                (lhs, rhs, group_sizes),
            ),
            f"xla_tiled (tile_m={tile_m})": (
                lambda a, b, g: gmm(a, b, g, impl="xla_tiled"),
                (lhs, rhs, group_sizes),
            ),
        }
        case = f"m={m} k={k} n={n} g={num_groups}"
        rows += time_rows(case, candidates, cotangent, repeats)
    return rows


def moe_rows(repeats: int) -> list[Row]:
    """A dense SwiGLU on tokens * top_k rows (the same active FLOPs), then the dropless layer."""
    rows = []
    for tokens, d_model, d_ff, num_experts, top_k in MOE_CASES:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((tokens, d_model), np.float32))
        logits = jnp.asarray(rng.standard_normal((tokens, num_experts), np.float32))
        routing = softmax_top_k(logits, top_k=top_k)
        params = init_expert_params(jax.random.key(1), num_experts, d_model, d_ff)
        cotangent = jnp.asarray(rng.standard_normal((tokens, d_model), np.float32))

        candidates: Candidates = {
            "dense SwiGLU, tokens*top_k rows": (
                functools.partial(dense_swiglu, top_k=top_k),
                (x, params),
            ),
            'moe_ffn dropless, gmm_impl="xla" (before)': (
                functools.partial(dropless_layer, gmm_impl="xla"),
                (x, params, routing),
            ),
            'moe_ffn dropless, gmm_impl="auto" = xla_tiled (after)': (
                functools.partial(dropless_layer, gmm_impl="auto"),
                (x, params, routing),
            ),
        }
        case = f"tokens={tokens} d_model={d_model} d_ff={d_ff} experts={num_experts} top_k={top_k}"
        rows += time_rows(case, candidates, cotangent, repeats)
    return rows


def dense_swiglu(x: jax.Array, params: dict, *, top_k: int) -> jax.Array:
    """Expert 0's SwiGLU on every token top_k times, summed back: the dense FLOPs of the layer."""
    rows = jnp.repeat(x, top_k, axis=0)  # [tokens*k, d_model]
    out = swiglu(rows, params["w_gate"][0], params["w_up"][0], params["w_down"][0])
    return out.reshape(x.shape[0], top_k, x.shape[1]).sum(axis=1)  # [tokens, d_model]


def dropless_layer(x: jax.Array, params: dict, routing: Routing, *, gmm_impl: str) -> jax.Array:
    """[tokens, d_model] -> [tokens, d_model] through `moe_ffn(strategy="dropless")`."""
    options = DroplessOptions(gmm_impl=gmm_impl)
    return moe_ffn(x, routing, params, strategy="dropless", options=options).y


def print_table(title: str, ratio_name: str, rows: list) -> None:
    print(f"\n{title}\n")
    print(
        f"| case | implementation | fwd ms | fwd / {ratio_name} | fwd+bwd ms "
        f"| fwd+bwd / {ratio_name} |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for case, name, forward, forward_ratio, both, both_ratio in rows:
        print(
            f"| {case} | {name} | {forward:.1f} | {forward_ratio:.2f} | {both:.1f} | "
            f"{both_ratio:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement")
    args = parser.parse_args()
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    print(f"jax {jax.__version__} on {jax.default_backend()}, {machine}")
    print_table("Grouped matmul, float32", "dense", gmm_rows(args.repeats))
    print_table("Dropless MoE layer, float32", "dense", moe_rows(args.repeats))


if __name__ == "__main__":
    main()
