"""Grouped matmul on CPU: dense matmul vs `ragged_dot` vs "xla_tiled", and a dropless MoE layer.

    python benchmarks/gmm_cpu.py [--repeats 7]

Each case times, jitted in float32, the forward pass and the forward plus backward pass (the
gradient wrt both operands) of a dense [m, k] @ [k, n] matmul with the same useful FLOPs, of
`kernels_pallas.gmm(impl="xla")` (`jax.lax.ragged_dot`) and of `impl="xla_tiled"`. Group sizes are
a multinomial draw over expert loads from a Dirichlet(5) distribution, so experts are unevenly
loaded as in a trained router. A second table times `moejax.moe.moe_ffn(strategy="dropless")`
with each implementation. Times are medians over `--repeats` runs after a warm-up run; ratios
are against the dense row of the same case, measured in the same run of this script.
"""

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import gmm
from kernels_pallas.grouped_matmul.xla_tiled import default_tile_m
from moejax.moe import moe_ffn
from moejax.routing import Routing, softmax_top_k

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


def gmm_rows(repeats: int) -> list[tuple[str, str, float, float, float, float]]:
    """(case, implementation, forward ms, forward ratio, fwd+bwd ms, fwd+bwd ratio) rows."""
    rows = []
    for m, k, n, num_groups in GMM_CASES:
        rng = np.random.default_rng(0)
        lhs = jnp.asarray(rng.standard_normal((m, k), np.float32))
        rhs = jnp.asarray(rng.standard_normal((num_groups, k, n), np.float32) / np.sqrt(k))
        group_sizes = jnp.asarray(random_group_sizes(rng, m, num_groups))
        cotangent = jnp.asarray(rng.standard_normal((m, n), np.float32))
        tile_m = default_tile_m(m, num_groups)
        case = f"m={m} k={k} n={n} g={num_groups}"
        impls: dict[str, tuple[Callable[..., jax.Array], tuple[jax.Array, ...]]] = {
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
        dense_times = None
        for name, (fn, args) in impls.items():
            forward = median_ms(jax.jit(fn), *args, repeats=repeats)
            both = median_ms(forward_and_backward(fn), *args, cotangent, repeats=repeats)
            dense_times = dense_times or (forward, both)
            rows.append(
                (case, name, forward, forward / dense_times[0], both, both / dense_times[1])
            )
    return rows


def moe_rows(repeats: int) -> list[tuple[str, str, float, float, float, float]]:
    """Dropless MoE layer rows, ratios against `gmm_impl="xla"` (ragged_dot)."""
    rows = []
    for tokens, d_model, d_ff, num_experts, top_k in MOE_CASES:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((tokens, d_model), np.float32))
        logits = jnp.asarray(rng.standard_normal((tokens, num_experts), np.float32))
        routing = softmax_top_k(logits, top_k=top_k)
        scale_in, scale_out = 1 / np.sqrt(d_model), 1 / np.sqrt(d_ff)
        params = {
            "w_gate": rng.standard_normal((num_experts, d_model, d_ff), np.float32) * scale_in,
            "w_up": rng.standard_normal((num_experts, d_model, d_ff), np.float32) * scale_in,
            "w_down": rng.standard_normal((num_experts, d_ff, d_model), np.float32) * scale_out,
        }
        params = {name: jnp.asarray(value) for name, value in params.items()}
        cotangent = jnp.asarray(rng.standard_normal((tokens, d_model), np.float32))
        case = f"tokens={tokens} d_model={d_model} d_ff={d_ff} experts={num_experts} top_k={top_k}"
        base_times = None
        for impl in ("xla", "xla_tiled"):

            def layer(x: jax.Array, params: dict, routing: Routing, impl: str = impl) -> jax.Array:
                return moe_ffn(x, routing, params, strategy="dropless", gmm_impl=impl).y

            forward = median_ms(jax.jit(layer), x, params, routing, repeats=repeats)
            both = median_ms(
                forward_and_backward(layer), x, params, routing, cotangent, repeats=repeats
            )
            base_times = base_times or (forward, both)
            rows.append((case, impl, forward, forward / base_times[0], both, both / base_times[1]))
    return rows


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
    print(f"jax {jax.__version__} on {jax.default_backend()}, {platform.processor() or '?'}")
    print_table("Grouped matmul, float32", "dense", gmm_rows(args.repeats))
    print_table("Dropless MoE layer (moe_ffn), float32", "ragged_dot", moe_rows(args.repeats))


if __name__ == "__main__":
    main()
