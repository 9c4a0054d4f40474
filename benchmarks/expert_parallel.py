"""Expert-parallel dispatch against annotation-only sharding, on 8 fake CPU devices.

    python benchmarks/expert_parallel.py [--repeats 5]

Each row compiles one training step of the MoE feed-forward block, `jax.value_and_grad` of
`sum(y * cotangent)` with respect to x and the expert weights, under a mesh of 8 host devices
(`--xla_force_host_platform_device_count=8`, set before jax is imported), with x batch-sharded
and the weights expert-sharded as the train step lays them out:

  annotation: `moe.dropless_dispatch` traced under the mesh with no shard_map: the sharding
      annotations are all the compiler gets, and it picks the collectives (what moejax did before
      `moejax.expert_parallel`);
  expert_parallel: `moe.moe_ffn(strategy="dropless")`, which runs `expert_parallel.sharded_dropless`
      (all-to-all of tokens; the padded exchange, as XLA:CPU has no ragged all-to-all).

Routing: "uniform" draws every assignment's expert uniformly; "zipf" draws it from a Zipf law
(s = 1.2) over the experts, so expert 0's shard receives most rows. Top-k experts are distinct per
token; nothing is dropped on either path. Per row: bytes the collectives produce per step on one
device (`moejax.hlo.bytes_by_kind`, summed; see there what a byte counts), the step time (median
of `--repeats` after a warm-up), and the load of the expert shards: the max over shards of the
rows a shard's experts receive, over the mean.

What fake-device times show and do not: the 8 "devices" are threads of one process on this
machine's cores, and a collective is a memory copy, so the times compare the compute and copying
each path does (how much work the compiler's choice of collectives adds), not network time. The
bytes are what a real interconnect would carry under the same partitioning, up to the padded
exchange's factor: on TPU/GPU the ragged exchange sends only the rows, and the "ragged MiB" column
gives those (the rows the busiest device sends to other expert shards, four exchanges).
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

from moejax import hlo, moe, sharding  # noqa: E402
from moejax.routing import Routing  # noqa: E402

TOKENS, D_MODEL, D_FF, NUM_EXPERTS, TOP_K = 4096, 256, 512, 16, 2
ZIPF_S = 1.2
WEIGHT_AXES = {
    "w_gate": ("expert", "embed", "expert_mlp"),
    "w_up": ("expert", "embed", "expert_mlp"),
    "w_down": ("expert", "expert_mlp", "embed"),
}
# (data, fsdp, expert, tensor)
MESHES = ((1, 1, 8, 1), (2, 1, 4, 1))


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


def shard_load(index: np.ndarray, shards: int) -> float:
    """max / mean over expert shards of the assignments their experts receive."""
    per_expert = np.bincount(index.reshape(-1), minlength=NUM_EXPERTS)
    per_shard = per_expert.reshape(shards, -1).sum(axis=1)
    return float(per_shard.max() / per_shard.mean())


def ragged_bytes(index: np.ndarray, mesh_shape) -> int:
    """Bytes the ragged exchange (TPU/GPU) would send from the busiest device per step: its rows
    bound for other expert shards, d_model float32 each, four exchanges (to the experts and back,
    forward and backward)."""
    data, fsdp, shards, _ = mesh_shape
    devices = data * fsdp * shards
    experts_per_shard = NUM_EXPERTS // shards
    busiest = 0
    # The batch axes are (data, fsdp, expert) in mesh order: device i holds the i-th slice of
    # tokens and is expert shard i % shards.
    for device, rows in enumerate(np.split(index, devices)):
        leaving = int(np.sum(rows // experts_per_shard != device % shards))
        busiest = max(busiest, leaving)
    return 4 * busiest * D_MODEL * 4


def step_fn(path: str):
    def loss(x, params, weights, index, cotangent):
        routing = Routing(index, weights, None, {})
        if path == "annotation":
            y, _ = moe.dropless_dispatch(x, routing, params)
        else:
            y = moe.moe_ffn(x, routing, params, strategy="dropless").y
        return jnp.sum(y * cotangent)

    return jax.value_and_grad(loss, argnums=(0, 1))


def measure(path: str, mesh_shape, index: np.ndarray, repeats: int) -> dict:
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
        compiled = jax.jit(step_fn(path)).lower(*args).compile()
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
    args = parser.parse_args()
    print(
        f"jax {jax.__version__}, {jax.device_count()} fake CPU devices on {os.cpu_count()} cores; "
        f"tokens {TOKENS}, d_model {D_MODEL}, d_ff {D_FF}, experts {NUM_EXPERTS}, top_k {TOP_K}, "
        f"float32, forward+backward"
    )
    header = (
        f"{'mesh d,f,e,t':>12} {'routing':>8} {'shard load':>10} {'path':>16} "
        f"{'MiB moved':>10} {'ragged MiB':>10} {'step ms':>8} {'bytes vs ann.':>13} "
        f"{'time vs ann.':>12}"
    )
    print(header)
    for mesh_shape in MESHES:
        for kind in ("uniform", "zipf"):
            index = expert_choices(kind)
            load = shard_load(index, mesh_shape[2])
            rows = {
                path: measure(path, mesh_shape, index, args.repeats)
                for path in ("annotation", "expert_parallel")
            }
            base = rows["annotation"]
            ragged = ragged_bytes(index, mesh_shape) / 2**20
            for path, row in rows.items():
                ragged_text = f"{ragged:>10.2f}" if path == "expert_parallel" else f"{'':>10}"
                print(
                    f"{','.join(map(str, mesh_shape)):>12} {kind:>8} {load:>10.2f} {path:>16} "
                    f"{row['bytes'] / 2**20:>10.2f} {ragged_text} {row['time'] * 1e3:>8.1f} "
                    f"{row['bytes'] / base['bytes']:>13.2f} {row['time'] / base['time']:>12.2f}"
                    f"   {row['by_kind']}"
                )


if __name__ == "__main__":
    main()
