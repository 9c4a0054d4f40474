"""Train-step throughput and compile time of a config on 1 and on 8 fake CPU devices.

    python benchmarks/train_throughput.py [--config configs/default.py] [--steps 20]

Each device count runs in its own process (the fake-device count is fixed when JAX starts).
Batches come from the real data pipeline; the timed loop includes fetching them. Prints a
table whose ratios are measured in one run of this script.
"""

import argparse
import json
import os
import platform
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
    import jax

    from moejax import config as config_lib
    from moejax import sharding
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
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, global_batch(mesh, next(batches)))
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    tokens = steps * config.data.global_batch_size * config.data.seq_len
    return {
        "compile_s": compile_seconds,
        "step_s": seconds / steps,
        "tokens_per_s": tokens / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/default.py"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.config, json.loads(args.child), args.steps)))
        return

    rows = []
    for name, (devices, overrides) in MESHES.items():
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        )
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--config",
                args.config,
                "--steps",
                str(args.steps),
                "--child",
                json.dumps(overrides),
            ],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append((name, json.loads(out.stdout.strip().splitlines()[-1])))
    base = rows[0][1]["tokens_per_s"]
    machine = platform.processor() or platform.machine()
    print(f"{Path(args.config).name}, {args.steps} timed steps; {machine}, {os.cpu_count()} cores")
    print("| mesh | compile (s) | step (ms) | tokens/s | vs 1 device |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows:
        print(
            f"| {name} | {r['compile_s']:.1f} | {r['step_s'] * 1e3:.0f} | "
            f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
