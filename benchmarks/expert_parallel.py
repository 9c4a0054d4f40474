"""Expert-parallel dispatch against annotation-only sharding, and with LLEP, on 8 fake CPU devices.

    python benchmarks/expert_parallel.py [--repeats 5] [--llep-margin 0.1] [--llep-max-foreign 4]

Each row compiles one training step of the MoE feed-forward block, `jax.value_and_grad` of
`sum(y * cotangent)` with respect to x and the expert weights, under a mesh of 8 host devices
(`--xla_force_host_platform_device_count=8`, set before jax is imported), with x batch-sharded
and the weights expert-sharded as the train step lays them out:

  annotation: `moe.dropless_dispatch` traced under the mesh with no shard_map: the sharding
      annotations are all the compiler gets, and it picks the collectives (what moejax did before
      its expert-parallel dispatch);
  expert_parallel: `moe.moe_ffn(strategy="expert_parallel")` (`moejax.moe.expert_parallel`:
      all-to-all of tokens; the padded exchange, as XLA:CPU has no ragged all-to-all);
  llep: `moe.moe_ffn(strategy="llep")` (Least-Loaded Expert Parallelism, `moejax.moe.llep`):
      the excess rows of overloaded expert shards, and their experts' weights, go to shards below
      the cap ceil((1 + margin) * mean load); the outputs are expert_parallel's.

Routing: "uniform" draws every assignment's expert uniformly; "zipf" draws it from a Zipf law
(s = 1.2) over the experts, so expert 0's shard receives most rows. Top-k experts are distinct per
token; nothing is dropped on either path. Per row: bytes the collectives produce per step on one
device (`moejax.parallel.hlo.bytes_by_kind`, summed; see there what a byte counts), the step time
(median
of `--repeats` after a warm-up), and the load of the expert shards: the max over shards of the
rows a shard's grouped matmuls compute (`expert_parallel.shard_loads`, the same plan the step
runs), over the mean; the worst group of devices that exchange among themselves. The
annotation path has no expert shards of its own; its row shows plain expert parallelism's load.

What fake-device times show and do not: the 8 "devices" are threads of one process on this
machine's cores, and a collective is a memory copy, so the times compare the compute and copying
each path does (how much work the compiler's choice of collectives adds), not network time. The
bytes are what a real interconnect would carry under the same partitioning, up to the padded
exchange's factor: on TPU/GPU the ragged exchange sends only the rows, and the "ragged MiB" column
gives those (the rows the busiest device sends to other expert shards, four exchanges; for LLEP
plus the borrowed experts' weights it sends, and their gradients coming back). LLEP's load
balance does not show in these times: the padded exchange and the grouped matmuls run over
worst-case buffers whatever the routing, and the fake devices share the same cores, so a shard
with less work frees no time for the others; on TPU/GPU with the ragged exchange a step waits for
its busiest shard, which is what the load column measures. LLEP's planning, reordering and
weight transfer do show, as the time and bytes it adds.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from moejax import moe  # noqa: E402
from moejax.moe import ExpertParallelOptions, LLEPOptions, expert_parallel, llep  # noqa: E402
from moejax.parallel import hlo, sharding  # noqa: E402
from moejax.routers.base import Routing  # noqa: E402

TOKENS, D_MODEL, D_FF, NUM_EXPERTS, TOP_K = 4096, 256, 512, 16, 2
ZIPF_S = 1.2
WEIGHT_AXES = {
    "w_gate": ("expert", "embed", "expert_mlp"),
    "w_up": ("expert", "embed", "expert_mlp"),
    "w_down": ("expert", "expert_mlp", "embed"),
}
# (data, fsdp, expert, tensor)
MESHES = ((1, 1, 8, 1), (2, 1, 4, 1))
PATHS = ("annotation", "expert_parallel", "llep")


def expert_choices(kind: str, seed: int = 0) -> np.ndarray:
    """[tokens, top_k] distinct experts per token, drawn uniformly or from Zipf(s=1.2)."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        probs = np.full(NUM_EXPERTS, 1.0 / NUM_EXPERTS)
    else:
        probs = 1.0 / np.arange(1, NUM_EXPERTS + 1) ** ZIPF_S
        probs /= probs.sum()
    return np.stack(
        [rng.choice(NUM_EXPERTS, TOP_K, replace=False, p=probs) for _ in range(TOKENS)]
    ).astype(np.int32)


def shard_load(index: np.ndarray, mesh_shape, llep_args: tuple | None) -> float:
    """max / mean over expert shards of the rows their grouped matmuls compute, worst group,
    plain or with LLEP's (margin, max_foreign)."""
    balance = llep.llep_balance(*llep_args) if llep_args else expert_parallel.PLAIN
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape, strict=True)))
    tokens = NamedSharding(mesh, sharding.logical_to_mesh(("batch", None)))
    with jax.set_mesh(mesh):
        loads = np.asarray(
            expert_parallel.shard_loads(
                jax.device_put(jnp.asarray(index), tokens), NUM_EXPERTS, mesh, balance
            )
        )  # [groups, shards]
    return float(np.max(loads.max(axis=1) / loads.mean(axis=1)))


def ragged_bytes(index: np.ndarray, mesh_shape, llep_args: tuple | None) -> int:
    """Bytes the ragged exchange (TPU/GPU) would send from the busiest device per step: its rows
    bound for other expert shards, d_model float32 each, four exchanges (to the experts and back,
    forward and backward), and with LLEP the weights of the experts it lends (forward) and their
    gradients (backward)."""
    data, fsdp, shards, _ = mesh_shape
    experts_per_shard = NUM_EXPERTS // shards
    expert_bytes = (3 * D_MODEL * D_FF) * 4
    busiest = 0
    # The batch axes are (data, fsdp, expert) in mesh order: device i holds the i-th slice of
    # tokens and is expert shard i % shards; each run of `shards` devices exchanges rows.
    for group in np.split(index, data * fsdp):
        counts = np.stack(
            [
                np.bincount(rows.reshape(-1), minlength=NUM_EXPERTS)
                for rows in np.split(group, shards)
            ]
        ).astype(np.int32)  # [shards, experts]
        lent = np.zeros(shards, np.int64)
        if llep_args:
            margin, max_foreign = llep_args
            plan = llep.llep_plan(counts, margin=margin, max_foreign=max_foreign)
            traffic = np.asarray(plan.traffic)  # [shards, shards, groups]
            borrowed = np.asarray(plan.borrowed_expert)
            owners = borrowed[borrowed < NUM_EXPERTS] // experts_per_shard
            lent = np.bincount(owners, minlength=shards)
        else:
            traffic = counts.reshape(shards, shards, experts_per_shard)
        sent = traffic.sum(axis=2)  # [shards, shards]
        leaving = sent.sum(axis=1) - np.diag(sent)
        moved = 4 * leaving * D_MODEL * 4 + 2 * lent * expert_bytes
        busiest = max(busiest, int(moved.max()))
    return busiest


def step_fn(path: str, options: moe.DispatchOptions | None):
    def loss(x, params, weights, index, cotangent):
        routing = Routing(index, weights, None, {})
        if options is None:  # annotation only
            y, _ = moe.dropless_dispatch(x, routing, params)
        else:
            mesh = sharding.kernel_mesh()
            y = moe.moe_ffn(x, routing, params, strategy=path, options=options, mesh=mesh).y
        return jnp.sum(y * cotangent)

    return jax.value_and_grad(loss, argnums=(0, 1))


def measure(path: str, mesh_shape, index: np.ndarray, repeats: int, options) -> dict:
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape, strict=True)))
    tokens = NamedSharding(mesh, sharding.logical_to_mesh(("batch", None)))
    weights_sharding = {
        name: NamedSharding(mesh, sharding.logical_to_mesh(axes))
        for name, axes in WEIGHT_AXES.items()
    }
    keys = jax.random.split(jax.random.key(0), 3)
    params = moe.init_expert_params(keys[0], NUM_EXPERTS, D_MODEL, D_FF)
    x = jax.random.normal(keys[1], (TOKENS, D_MODEL))
    cotangent = jax.random.normal(keys[2], (TOKENS, D_MODEL))
    weights = jnp.full((TOKENS, TOP_K), 1.0 / TOP_K)
    args = jax.device_put(
        (x, params, weights, jnp.asarray(index), cotangent),
        (tokens, weights_sharding, tokens, tokens, tokens),
    )
    with jax.set_mesh(mesh):
        compiled = jax.jit(step_fn(path, options)).lower(*args).compile()
        found = hlo.collectives(compiled.as_text())
        jax.block_until_ready(compiled(*args))  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - start)
    by_kind = hlo.bytes_by_kind(found)
    return {
        "bytes": sum(by_kind.values()),
        "by_kind": {kind: n for kind, n in by_kind.items() if n},
        "time": statistics.median(times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--llep-margin", type=float, default=0.1)
    parser.add_argument("--llep-max-foreign", type=int, default=4)
    args = parser.parse_args()
    llep_args = (args.llep_margin, args.llep_max_foreign)
    # Per path: the strategy's options (None: annotations only) and LLEP's plan arguments.
    paths = {
        "annotation": (None, None),
        "expert_parallel": (ExpertParallelOptions(), None),
        "llep": (LLEPOptions(margin=llep_args[0], max_foreign=llep_args[1]), llep_args),
    }
    print(
        f"jax {jax.__version__}, {jax.device_count()} fake CPU devices on {os.cpu_count()} cores; "
        f"tokens {TOKENS}, d_model {D_MODEL}, d_ff {D_FF}, experts {NUM_EXPERTS}, top_k {TOP_K}, "
        f"float32, forward+backward; LLEP margin {args.llep_margin}, "
        f"max_foreign {args.llep_max_foreign}"
    )
    columns = (
        "mesh d,f,e,t",
        "routing",
        "path",
        "load max/mean",
        "MiB moved",
        "ragged MiB",
        "step ms",
        "bytes vs ann.",
        "time vs ann.",
        "collectives MiB",
    )
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for mesh_shape in MESHES:
        for kind in ("uniform", "zipf"):
            index = expert_choices(kind)
            rows = {
                path: measure(path, mesh_shape, index, args.repeats, paths[path][0])
                for path in PATHS
            }
            base = rows["annotation"]
            for path, row in rows.items():
                options, plan_args = paths[path]
                ragged = (
                    ""
                    if options is None
                    else f"{ragged_bytes(index, mesh_shape, plan_args) / 2**20:.2f}"
                )
                kinds = ", ".join(f"{k} {n / 2**20:.2f}" for k, n in row["by_kind"].items())
                cells = (
                    ",".join(map(str, mesh_shape)),
                    kind,
                    path,
                    f"{shard_load(index, mesh_shape, plan_args):.2f}",
                    f"{row['bytes'] / 2**20:.2f}",
                    ragged,
                    f"{row['time'] * 1e3:.1f}",
                    f"{row['bytes'] / base['bytes']:.2f}",
                    f"{row['time'] / base['time']:.2f}",
                    kinds,
                )
                print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
