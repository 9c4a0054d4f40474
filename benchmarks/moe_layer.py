"""MoE layer on CPU: forward+backward time and peak memory of every dispatch path vs dense.

    python benchmarks/moe_layer.py [--repeats 5] [--row-budget-s 8]

Each case times one jitted float32 training step, `jax.value_and_grad` of `sum(y * cotangent)`
with respect to x, the expert parameters and the router logits, for these paths:

  (a) a dense SwiGLU on tokens * top_k rows with expert 0's weights: the same useful FLOPs as
      the layer and no routing, the physical limit;
  (b) `moe_ffn(strategy="dropless", gmm_impl="xla")`, i.e. `jax.lax.ragged_dot`;
  (c) `moe_ffn(strategy="capacity")` at capacity_factor 1.25 and at the smallest factor that
      drops nothing for this routing (slots from a per-expert rank, rows gathered into
      [experts, capacity, d_model] buffers and back);
  (d) every expert on every token, weighted by a [tokens, experts] combine matrix that is zero
      outside the top-k;
  and the default `moe_ffn(strategy="dropless", gmm_impl="auto")`.

Every MoE path routes inside the step with `moejax.routers.softmax_top_k` on seeded random
logits plus a per-expert bias, so experts are unevenly loaded as in a trained router. Every path
takes the same arguments, all experts' weights included, and returns gradients of the same
shapes, so the argument and output buffers are equal across rows and peak memory differs only by
the temporaries of the step. Peak memory is argument + output + temp - alias bytes of the
compiled executable's `memory_analysis()`; its `peak_memory_in_bytes` leaves temporaries out on
XLA:CPU. Times are medians after a warm-up run, with the rows timed in turn, round by round, so
that a change in the machine's load falls on all of them; a row whose warm-up run takes longer
than `--row-budget-s` / `--repeats` is timed fewer times, down to its warm-up run alone (the
executable is compiled ahead of time, so that run does not include compilation). A row whose
peak memory would not fit in `--memory-fraction` of the available memory is not run. Ratios are
against rows measured in the same run of this script.

The run ends with the summary table of issue 17: per case, the time of the default dropless
path, capacity at 1.25, `ragged_dot` and every expert, as multiples of dense (a).
"""

import argparse
import dataclasses
import functools
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.grouped_matmul.ops import resolve_impl
from moejax import moe
from moejax.moe import ExpertParams, expert_capacity, init_expert_params, moe_ffn, swiglu
from moejax.routers.base import routing_statistics
from moejax.routers.softmax_top_k import softmax_top_k

# (tokens, d_model, d_ff, num_experts, top_k); the first is the case the timing targets name.
CASES = ((4096, 512, 1024, 8, 2), (4096, 512, 128, 64, 8))
# Standard deviation of a per-expert logit bias: a load max/mean of roughly 1.3 to 1.8.
EXPERT_BIAS_STD = 0.2
CAPACITY_FACTOR = 1.25
# Targets: time vs dense (a) per case of the default dropless path and of capacity at 1.25
# (issue 17), the first case's speed-up over ragged_dot, peak memory vs dense (a).
MAX_DROPLESS_VS_DENSE = (1.5, 1.6)
MAX_CAPACITY_VS_DENSE = (1.6, 2.0)
MIN_SPEEDUP_VS_RAGGED = 2.0
MAX_PEAK_VS_DENSE = 2.0
# Rows of every case's table, in the order `run_case` builds them.
DENSE, RAGGED, CAPACITY, CAPACITY_NO_DROPS, EVERY_EXPERT, DEFAULT = range(6)

# (x [tokens, d_model], expert_params, router_logits [tokens, experts]) -> y [tokens, d_model]
Path = Callable[[jax.Array, ExpertParams, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Result:
    """One row of a table: a path's step time and memory."""

    name: str
    runs: int
    warm_up_only: bool
    ms: float
    ms_min: float
    ms_max: float
    peak_bytes: int
    temp_bytes: int
    loss: float
    dx: np.ndarray | None


def dense_swiglu(x: jax.Array, params: ExpertParams, logits: jax.Array, *, top_k: int) -> jax.Array:
    """Expert 0's SwiGLU on every token top_k times, summed back; `logits` unused."""
    del logits
    rows = jnp.repeat(x, top_k, axis=0)  # [tokens*k, d_model]
    out = swiglu(rows, params["w_gate"][0], params["w_up"][0], params["w_down"][0])
    return out.reshape(x.shape[0], top_k, x.shape[1]).sum(axis=1)  # [tokens, d_model]


def routed_layer(
    x: jax.Array,
    params: ExpertParams,
    logits: jax.Array,
    *,
    top_k: int,
    strategy: str,
    **options: object,
) -> jax.Array:
    """`softmax_top_k` routing, then `moe_ffn` with the given strategy and its options."""
    routing = softmax_top_k(logits, top_k=top_k)
    chosen = moe.get(strategy).options(**options)
    return moe_ffn(x, routing, params, strategy=strategy, options=chosen).y


def every_expert(x: jax.Array, params: ExpertParams, logits: jax.Array, *, top_k: int) -> jax.Array:
    """All experts on all tokens, combined by a [tokens, experts] matrix zero outside the top-k.

    The experts are laid side by side as one [d_model, experts * d_ff] MLP, so each projection is
    one large matmul (about twice as fast on XLA:CPU as the batched "td,edf->tef" einsum). The
    combine weight scales each expert's hidden activations rather than its output: the same
    result, since w_down is linear, without a [tokens, experts, d_model] buffer.
    """
    routing = softmax_top_k(logits, top_k=top_k)
    (num_tokens, d_model), (num_experts, _, d_ff) = x.shape, params["w_gate"].shape
    top_k_mask = jax.nn.one_hot(routing.expert_index, num_experts, dtype=x.dtype)
    combine = jnp.einsum("tke,tk->te", top_k_mask, routing.combine_weights)  # [tokens, experts]
    w_gate = params["w_gate"].transpose(1, 0, 2).reshape(d_model, num_experts * d_ff)
    w_up = params["w_up"].transpose(1, 0, 2).reshape(d_model, num_experts * d_ff)
    hidden = jax.nn.silu(x @ w_gate) * (x @ w_up)  # [tokens, experts*d_ff]
    hidden = hidden.reshape(num_tokens, num_experts, d_ff) * combine[:, :, None]
    hidden = hidden.reshape(num_tokens, num_experts * d_ff)
    return hidden @ params["w_down"].reshape(num_experts * d_ff, d_model)  # [tokens, d_model]


def training_step(path: Path) -> Callable[..., object]:
    """Loss `sum(path(x, params, logits) * cotangent)` and its gradient wrt the first three."""

    def loss(
        x: jax.Array, params: ExpertParams, logits: jax.Array, cotangent: jax.Array
    ) -> jax.Array:
        return jnp.sum(path(x, params, logits) * cotangent)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """A path's training step compiled ahead of time, with its memory analysis."""

    name: str
    executable: Callable[..., tuple]
    peak_bytes: int
    temp_bytes: int


def compile_step(name: str, path: Path, args: tuple) -> CompiledStep:
    """Peak bytes are argument + output + temp - alias of the executable's memory analysis."""
    executable = jax.jit(training_step(path)).lower(*args).compile()
    stats = executable.memory_analysis()
    peak_bytes = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )
    return CompiledStep(name, executable, peak_bytes, stats.temp_size_in_bytes)


def timed_run(step: CompiledStep, args: tuple) -> tuple[float, tuple]:
    """Seconds one call of the step takes, and its output."""
    start = time.perf_counter()
    out = jax.block_until_ready(step.executable(*args))
    return time.perf_counter() - start, out


def time_interleaved(
    steps: list[CompiledStep],
    args: tuple,
    repeats: int,
    row_budget_s: float,
    memory_fraction: float,
) -> list[Result]:
    """Warm-up run of every step, then rounds that each time every step once, in turn.

    Interleaving spreads changes in the machine's load over all rows alike, so ratios between
    rows stay meaningful on a shared CPU. A step gets as many rounds as fit `row_budget_s` at
    its warm-up time, up to `repeats`, and none when its warm-up alone exceeds the budget (its
    warm-up run is then its time). A step whose peak memory exceeds `memory_fraction` of the
    memory available is not run at all (it could take memory from other processes).
    """
    warm_up_s, outputs = {}, {}
    for step in steps:
        available = available_memory_bytes()
        if available is None or step.peak_bytes <= memory_fraction * available:
            warm_up_s[step.name], outputs[step.name] = timed_run(step, args)
    rounds = {name: min(repeats, int(row_budget_s // s)) for name, s in warm_up_s.items()}
    times: dict[str, list[float]] = {name: [] for name in warm_up_s}
    for round_index in range(repeats):
        for step in steps:
            if rounds.get(step.name, 0) > round_index:
                seconds, outputs[step.name] = timed_run(step, args)
                times[step.name].append(seconds)

    results = []
    for step in steps:
        if step.name not in warm_up_s:
            results.append(
                Result(
                    step.name,
                    0,
                    False,
                    math.nan,
                    math.nan,
                    math.nan,
                    step.peak_bytes,
                    step.temp_bytes,
                    0.0,
                    None,
                )
            )
            continue
        step_times = times[step.name] or [warm_up_s[step.name]]
        loss, (dx, _, _) = outputs[step.name]
        results.append(
            Result(
                name=step.name,
                runs=len(step_times),
                warm_up_only=not times[step.name],
                ms=1e3 * statistics.median(step_times),
                ms_min=1e3 * min(step_times),
                ms_max=1e3 * max(step_times),
                peak_bytes=step.peak_bytes,
                temp_bytes=step.temp_bytes,
                loss=float(loss),
                dx=np.asarray(dx),
            )
        )
    return results


def run_case(
    tokens: int,
    d_model: int,
    d_ff: int,
    num_experts: int,
    top_k: int,
    repeats: int,
    row_budget_s: float,
    memory_fraction: float,
) -> tuple[list[Result], str]:
    """Every path on one shape; returns the rows, in the order DENSE ... DEFAULT, and a routing
    summary."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((tokens, d_model), np.float32))
    expert_bias = rng.normal(0.0, EXPERT_BIAS_STD, num_experts).astype(np.float32)
    logits = rng.standard_normal((tokens, num_experts), np.float32) + expert_bias
    logits = jnp.asarray(logits)
    params = init_expert_params(jax.random.key(1), num_experts, d_model, d_ff)
    cotangent = jnp.asarray(rng.standard_normal((tokens, d_model), np.float32))
    args = (x, params, logits, cotangent)

    routing = softmax_top_k(logits, top_k=top_k)
    loads = np.bincount(np.asarray(routing.expert_index).reshape(-1), minlength=num_experts)
    # The smallest factor whose capacity holds the busiest expert; E / (tokens * k) is a power
    # of two on these shapes, so the float is exact.
    no_drop_factor = float(loads.max()) * num_experts / (tokens * top_k)
    if expert_capacity(tokens, num_experts, top_k, no_drop_factor) < loads.max():
        raise ValueError(f"no_drop_factor: {no_drop_factor} drops assignments")
    capacity = expert_capacity(tokens, num_experts, top_k, CAPACITY_FACTOR)
    # Each expert drops exactly the assignments past its capacity.
    dropped = np.maximum(loads - capacity, 0).sum() / (tokens * top_k)
    load_ratio = float(routing_statistics(routing, num_experts)["load_max_over_mean"])
    summary = (
        f"expert load max/mean {load_ratio:.2f}; capacity_factor {CAPACITY_FACTOR} gives "
        f"{capacity} slots per expert and drops {100 * dropped:.1f}% of assignments"
    )

    auto_impl = resolve_impl("auto")
    paths: dict[str, Path] = {
        "(a) dense SwiGLU, tokens*top_k rows": functools.partial(dense_swiglu, top_k=top_k),
        '(b) dropless, gmm_impl="xla" (ragged_dot)': functools.partial(
            routed_layer, top_k=top_k, strategy="dropless", gmm_impl="xla"
        ),
        f"(c) capacity, capacity_factor={CAPACITY_FACTOR}": functools.partial(
            routed_layer, top_k=top_k, strategy="capacity", capacity_factor=CAPACITY_FACTOR
        ),
        f"(c) capacity, capacity_factor={no_drop_factor:g} (no drops)": functools.partial(
            routed_layer, top_k=top_k, strategy="capacity", capacity_factor=no_drop_factor
        ),
        "(d) every expert on every token": functools.partial(every_expert, top_k=top_k),
        f'dropless, gmm_impl="auto" ({auto_impl})': functools.partial(
            routed_layer, top_k=top_k, strategy="dropless", gmm_impl="auto"
        ),
    }
    steps = [compile_step(name, path, args) for name, path in paths.items()]
    results = time_interleaved(steps, args, repeats, row_budget_s, memory_fraction)
    return results, summary


def agreement(results: list[Result]) -> str:
    """How far the drop-free MoE paths' loss and x-gradient are from the default path's."""
    reference = results[DEFAULT]
    drop_free = [results[i] for i in (RAGGED, CAPACITY_NO_DROPS, EVERY_EXPERT)]
    drop_free = [r for r in drop_free if r.dx is not None]
    if reference.dx is None or not drop_free:
        return "Agreement not checked: the default path or every drop-free path was not run."
    loss_error = max(abs(r.loss - reference.loss) for r in drop_free)
    dx_scale = np.max(np.abs(reference.dx))
    dx_error = max(np.max(np.abs(r.dx - reference.dx)) for r in drop_free) / dx_scale
    return (
        f"Drop-free paths among (b), (c, no drops), (d) that ran vs the default: "
        f"max |loss difference| "
        f"{loss_error:.2e} (loss {reference.loss:.2f}), max |dx difference| / max |dx| "
        f"{dx_error:.2e}"
    )


def print_table(title: str, results: list[Result]) -> None:
    dense, ragged = results[DENSE], results[RAGGED]
    print(f"\n{title}\n")
    print(
        "| path | runs | fwd+bwd ms | min-max ms | / (a) | / (b) | peak MiB | peak / (a) "
        "| of which temp MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        runs = f"{r.runs}*" if r.warm_up_only else str(r.runs) if r.runs else "not run"
        print(
            f"| {r.name} | {runs} | {r.ms:.0f} | {r.ms_min:.0f}-{r.ms_max:.0f} "
            f"| {r.ms / dense.ms:.2f} | {r.ms / ragged.ms:.2f} "
            f"| {r.peak_bytes / 2**20:.0f} | {r.peak_bytes / dense.peak_bytes:.2f} "
            f"| {r.temp_bytes / 2**20:.0f} |"
        )


def print_summary(cases: list[tuple[tuple[int, ...], list[Result]]]) -> None:
    """Issue 17's table: one line per case, each path's median time over dense (a)'s."""
    columns = (
        ("dense", DENSE),
        ("moejax dropless", DEFAULT),
        (f"moejax capacity ({CAPACITY_FACTOR})", CAPACITY),
        ("ragged_dot", RAGGED),
        ("all experts", EVERY_EXPERT),
    )
    tokens, d_model = cases[0][0][:2]
    print(f"\n| T={tokens}, d={d_model} | " + " | ".join(name for name, _ in columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for (_, _, d_ff, num_experts, top_k), results in cases:
        dense = results[DENSE]
        cells = [
            f"{results[i].ms / dense.ms:.2f}x" if results[i].runs else "not run" for _, i in columns
        ]
        print(f"| E={num_experts}, f={d_ff}, k={top_k} | " + " | ".join(cells) + " |")


def verdict(passed: bool, text: str, evaluated: bool = True) -> str:
    """A PASS/FAIL line, or NOT EVALUATED where a row it needs was not run."""
    return f"{('PASS' if passed else 'FAIL') if evaluated else 'NOT EVALUATED'}: {text}"


def time_verdict(case: str, path: str, result: Result, dense: Result, target: float) -> str:
    """Whether `result` took at most `target` times dense (a)'s time."""
    return verdict(
        result.ms <= target * dense.ms,
        f"{case}: {path} at {result.ms / dense.ms:.2f}x dense (a), target <= {target}x",
        evaluated=bool(dense.runs and result.runs),
    )


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None where there is no such file."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return 1024 * int(line.split()[1])
    except OSError:
        pass
    return None


def processor_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per row at most")
    parser.add_argument(
        "--row-budget-s",
        type=float,
        default=8.0,
        help="timed runs per row are cut to fit this many seconds (at least the warm-up run)",
    )
    parser.add_argument(
        "--memory-fraction",
        type=float,
        default=0.8,
        help="a row runs only if its peak memory fits in this fraction of the available memory",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    print(
        f"jax {jax.__version__} on {jax.default_backend()}, {processor_name()}, "
        f"{os.cpu_count()} cores, float32; load average {os.getloadavg()[0]:.2f} at start "
        f"(other processes may share the CPU)"
    )
    verdicts, summary_cases = [], []
    for case_index, (tokens, d_model, d_ff, num_experts, top_k) in enumerate(CASES):
        results, summary = run_case(
            tokens,
            d_model,
            d_ff,
            num_experts,
            top_k,
            args.repeats,
            args.row_budget_s,
            args.memory_fraction,
        )
        case = f"tokens={tokens} d_model={d_model} d_ff={d_ff} experts={num_experts} top_k={top_k}"
        print_table(f"MoE layer fwd+bwd, {case}; {summary}", results)
        print(f"\n{agreement(results)}")
        summary_cases.append(((tokens, d_model, d_ff, num_experts, top_k), results))
        dense, ragged, default = results[DENSE], results[RAGGED], results[DEFAULT]
        capacity = results[CAPACITY]
        dropless_target = MAX_DROPLESS_VS_DENSE[case_index]
        verdicts.append(time_verdict(case, "default dropless", default, dense, dropless_target))
        if case_index == 0:
            verdicts.append(
                verdict(
                    ragged.ms >= MIN_SPEEDUP_VS_RAGGED * default.ms,
                    f"{case}: default dropless {ragged.ms / default.ms:.2f}x faster than "
                    f"ragged_dot (b), target >= {MIN_SPEEDUP_VS_RAGGED}x",
                    evaluated=bool(ragged.runs and default.runs),
                )
            )
        capacity_path = f"capacity, factor {CAPACITY_FACTOR},"
        verdicts.append(
            time_verdict(case, capacity_path, capacity, dense, MAX_CAPACITY_VS_DENSE[case_index])
        )
        verdicts.append(
            verdict(
                default.peak_bytes <= MAX_PEAK_VS_DENSE * dense.peak_bytes,
                f"{case}: default dropless peak memory {default.peak_bytes / dense.peak_bytes:.2f}x"
                f" dense (a), target <= {MAX_PEAK_VS_DENSE}x",
            )
        )
    print(
        f"\nruns: timed runs after one warm-up run, median reported; rows are timed in turn, "
        f"round by round; {args.repeats} unless the warm-up run took over "
        f"{args.row_budget_s:g} s / {args.repeats}; "
        "'1*' = the warm-up run alone (it took over the row budget); 'not run' = peak memory "
        f"over {args.memory_fraction:g} of the available memory, time not measured."
    )
    print_summary(summary_cases)
    print("\n" + "\n".join(verdicts))
    print(
        f"\nTotal {time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.2f} "
        "at the end."
    )


if __name__ == "__main__":
    main()
