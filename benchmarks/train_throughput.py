"""Train-step throughput, compile time and page faults of a config on 1 and 8 fake CPU devices,
with moejax's malloc settings and with glibc's defaults.

    python benchmarks/train_throughput.py [--config configs/default.py] [--steps 20] [--rounds 2]
        [--meshes "1 device"]

Each measurement runs in its own process (the fake-device count is fixed when JAX starts, and
the malloc settings must precede that). The child applies them as train.py does, with
`allocator.tune_malloc()` before anything starts JAX's backend; `MOEJAX_MALLOC_TUNING=0` in its
environment keeps glibc's defaults (moejax/training/allocator.py). The two settings alternate
within each round, the first of them alternating from round to round, so that a change in the
machine's load reaches both. Batches come from the real data pipeline; the timed loop includes
fetching them, and its minor page faults and kernel share of CPU time are counted over the
whole process. Prints one row per measurement and the ratios of this run.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MESHES = {
    "1 device": (1, ["mesh.data=1"]),
    "8 devices, data=8": (8, ["mesh.data=8"]),
    "8 devices, data=2 expert=4": (8, ["mesh.data=2", "mesh.expert=4"]),
}


def measure(config_path: str, overrides: list[str], steps: int) -> dict:
    """Runs in the child process: compile time, then `steps` timed train steps."""
    sys.path.insert(0, str(ROOT))
    from moejax.training import allocator

    tuning = allocator.tune_malloc()  # as train.py, before JAX's backend starts
    import jax

    from moejax import config as config_lib
    from moejax.parallel import sharding
    from moejax.training import corpus
    from moejax.training import state as state_lib
    from moejax.training.step import global_batch, make_train_step

    config = config_lib.apply_overrides(config_lib.load_config_file(config_path), overrides)
    mesh = sharding.make_mesh(config_lib.validate(config, jax.device_count()))
    layout = state_lib.state_layout(config, mesh)
    state = state_lib.init_state(config, layout)
    batches = corpus.train_iterator(config.data, num_workers=0)
    step = make_train_step(layout, mesh)
    batch = global_batch(mesh, next(batches))
    start = time.perf_counter()
    compiled = step.compile(layout.restore_target(), batch)
    compile_seconds = time.perf_counter() - start
    del compiled
    state, metrics = step(state, batch)  # warm-up (also fills caches)
    jax.block_until_ready(metrics)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, global_batch(mesh, next(batches)))
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    tokens = steps * config.data.global_batch_size * config.data.seq_len
    kernel = after.ru_stime - before.ru_stime
    return {
        "malloc_tuned": tuning.applied,
        "malloc": tuning.reason,
        "compile_s": compile_seconds,
        "step_s": seconds / steps,
        "tokens_per_s": tokens / seconds,
        "faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
        "kernel_share": kernel / (kernel + after.ru_utime - before.ru_utime),
        "peak_rss_mib": after.ru_maxrss / 1024,  # KiB on Linux
    }


def _child(args: argparse.Namespace, devices: int, overrides: list[str], tuned: bool) -> dict:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        MOEJAX_MALLOC_TUNING="1" if tuned else "0",
    )
    command = [sys.executable, __file__, "--config", args.config, "--steps", str(args.steps)]
    out = subprocess.run(
        [*command, "--child", json.dumps(overrides)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["malloc_tuned"] != tuned:
        raise RuntimeError(f"asked for malloc tuning {tuned}, the child says {result['malloc']}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/default.py"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per setting")
    parser.add_argument("--meshes", nargs="+", choices=list(MESHES), default=list(MESHES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.config, json.loads(args.child), args.steps)))
        return

    # results[mesh][tuned]: one measurement per round
    results = {name: {True: [], False: []} for name in args.meshes}
    for round_index in range(args.rounds):
        order = (True, False) if round_index % 2 == 0 else (False, True)
        for name in args.meshes:
            devices, overrides = MESHES[name]
            for tuned in order:
                results[name][tuned].append(_child(args, devices, overrides, tuned))

    machine = platform.processor() or platform.machine()
    print(
        f"{Path(args.config).name}, {args.steps} timed steps, {args.rounds} alternating rounds; "
        f"{machine}, {os.cpu_count()} cores; tuned = {results[args.meshes[0]][True][0]['malloc']}"
    )
    print(
        "| mesh | malloc | round | compile (s) | step (ms) | tokens/s | minor faults / step "
        "| kernel share of CPU | peak RSS (MiB) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, by_setting in results.items():
        for tuned, label in ((False, "glibc defaults"), (True, "tuned")):
            for round_index, r in enumerate(by_setting[tuned], 1):
                print(
                    f"| {name} | {label} | {round_index} | {r['compile_s']:.1f} | "
                    f"{r['step_s'] * 1e3:.0f} | {r['tokens_per_s']:,.0f} | "
                    f"{r['faults_per_step']:,.0f} | {r['kernel_share']:.0%} | "
                    f"{r['peak_rss_mib']:,.0f} |"
                )
    print()
    print(
        "| mesh | tokens/s, tuned / defaults, per round | faults / step, defaults -> tuned "
        "| tuned tokens/s vs 1 device |"
    )
    print("|---|---|---|---:|")
    base = statistics.median(r["tokens_per_s"] for r in results[args.meshes[0]][True])
    for name, by_setting in results.items():
        pairs = list(zip(by_setting[True], by_setting[False], strict=True))
        speedups = ", ".join(f"{t['tokens_per_s'] / d['tokens_per_s']:.2f}x" for t, d in pairs)
        faults = ", ".join(
            f"{d['faults_per_step']:,.0f} -> {t['faults_per_step']:,.0f}" for t, d in pairs
        )
        tuned_median = statistics.median(r["tokens_per_s"] for r in by_setting[True])
        print(f"| {name} | {speedups} | {faults} | {tuned_median / base:.2f}x |")


if __name__ == "__main__":
    main()
