"""The ragged against the padded token exchange of expert parallelism, on the devices present.

    python benchmarks/expert_exchange.py [--exchange both|ragged|padded] [--repeats 5] [--quick]

Each row times one forward+backward step of `moe_ffn` with an expert-sharding strategy (`jax.
value_and_grad` of `sum(y * cotangent)` with respect to x and the expert weights) over a mesh
that puts every device on the `expert` axis, with x batch-sharded and the weights expert-sharded
as the train step lays them out. The two exchanges (see `moejax.moe.expert_parallel`):

  ragged: `jax.lax.ragged_all_to_all` sends each expert shard only its rows (TPU and GPU; XLA:CPU
      does not implement it);
  padded: `jax.lax.all_to_all` of one worst-case buffer per destination, n times the bytes.

Routing: "uniform" draws each token's top-k distinct experts uniformly; "zipf" from a Zipf law
(s = 1.2) over the experts, so the first shard receives most rows. Rows with
`--strategies expert_parallel llep` add Least-Loaded Expert Parallelism (`moejax.moe.llep`,
margin 0.1, max_foreign 2), which moves the
excess rows of overloaded shards, with their experts' weights, to shards below the load cap.
Per row: the step time (median of `--repeats` after a compile-and-warm-up run), the time over
the padded exchange's of the same routing and balance, the rows of the busiest expert shard over
the mean (`expert_parallel.shard_loads`), and the largest difference of the outputs and
gradients from the padded exchange's, over the largest padded value (the two exchanges compute
the same thing; a large difference is a bug).

Accelerators: bfloat16, 8192 tokens per device, d_model 1024, d_ff 2048, 4 experts per device,
top-2. CPU (fake devices: `XLA_FLAGS=--xla_force_host_platform_device_count=8`, with
`--exchange padded`): float32, 512 tokens per device, d_model 256, d_ff 512. `--quick` shrinks
either (a smoke test). With fewer than two devices there is nothing to exchange: the script says
so and exits with status 0. The last line, `summary: ...`, is for scripts/accelerator_check.sh.
"""

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from moejax import moe
from moejax.moe import ExpertParallelOptions, LLEPOptions, expert_parallel, llep
from moejax.parallel import sharding
from moejax.routers.base import Routing

ZIPF_S = 1.2
TOP_K = 2
# Largest relative difference between the exchanges' results that is rounding: the weight
# gradients sum the same rows in another order.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
WEIGHT_AXES = {
    "w_gate": ("expert", "embed", "expert_mlp"),
    "w_up": ("expert", "embed", "expert_mlp"),
    "w_down": ("expert", "expert_mlp", "embed"),
}


@dataclasses.dataclass(frozen=True)
class Shape:
    tokens_per_device: int
    d_model: int
    d_ff: int
    experts_per_device: int
    dtype: jnp.dtype


def pick_shape(backend: str, quick: bool) -> Shape:
    if backend == "cpu":
        return Shape(64, 64, 128, 2, jnp.float32) if quick else Shape(512, 256, 512, 2, jnp.float32)
    if quick:
        return Shape(1024, 256, 512, 4, jnp.bfloat16)
    return Shape(8192, 1024, 2048, 4, jnp.bfloat16)


def expert_choices(kind: str, tokens: int, num_experts: int, seed: int = 0) -> np.ndarray:
    """[tokens, top_k] distinct experts per token, uniform or Zipf(1.2) over the experts."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        logits = np.zeros(num_experts)
    else:
        logits = -ZIPF_S * np.log(np.arange(1, num_experts + 1))
    # The top k of logits plus Gumbel noise draws k experts without replacement.
    noisy = logits + rng.gumbel(size=(tokens, num_experts))  # [tokens, experts]
    return np.argsort(-noisy, axis=1)[:, :TOP_K].astype(np.int32)


# The strategies that split experts over the mesh: their options for an exchange, and the
# balance `shard_loads` counts their rows with.
STRATEGIES = {
    "expert_parallel": (
        lambda exchange: ExpertParallelOptions(exchange=exchange),
        expert_parallel.PLAIN,
    ),
    "llep": (
        lambda exchange: LLEPOptions(exchange=exchange, margin=0.1, max_foreign=2),
        llep.llep_balance(0.1, 2),
    ),
}


def step_fn(exchange: str, strategy: str):
    options = STRATEGIES[strategy][0](exchange)

    def loss(x, params, weights, index, cotangent):
        routing = Routing(index, weights, None, {})
        mesh = sharding.kernel_mesh()
        y = moe.moe_ffn(x, routing, params, strategy=strategy, options=options, mesh=mesh).y
        return jnp.sum(y.astype(jnp.float32) * cotangent)

    return jax.value_and_grad(loss, argnums=(0, 1))


def measure(mesh, shape: Shape, index: np.ndarray, exchange: str, strategy: str, repeats: int):
    """(median step seconds, (loss, grads)) of one forward+backward step."""
    tokens = NamedSharding(mesh, sharding.logical_to_mesh(("batch", None)))
    weight_shardings = {
        name: NamedSharding(mesh, sharding.logical_to_mesh(axes))
        for name, axes in WEIGHT_AXES.items()
    }
    num_tokens, num_experts = index.shape[0], shape.experts_per_device * mesh.size
    keys = jax.random.split(jax.random.key(0), 4)
    params = moe.init_expert_params(keys[0], num_experts, shape.d_model, shape.d_ff, shape.dtype)
    x = jax.random.normal(keys[1], (num_tokens, shape.d_model), shape.dtype)
    cotangent = jax.random.normal(keys[2], (num_tokens, shape.d_model))
    weights = jax.nn.softmax(jax.random.normal(keys[3], (num_tokens, TOP_K)), axis=-1)
    args = jax.device_put(
        (x, params, weights.astype(shape.dtype), jnp.asarray(index), cotangent),
        (tokens, weight_shardings, tokens, tokens, tokens),
    )
    with jax.set_mesh(mesh):
        step = jax.jit(step_fn(exchange, strategy))
        result = jax.block_until_ready(step(*args))  # compile and warm up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(step(*args))
            times.append(time.perf_counter() - start)
    return statistics.median(times), jax.device_get(result)


def load_ratio(mesh, index: np.ndarray, num_experts: int, strategy: str) -> float:
    """Rows of the busiest expert shard over the mean."""
    tokens = NamedSharding(mesh, sharding.logical_to_mesh(("batch", None)))
    with jax.set_mesh(mesh):
        loads = np.asarray(
            expert_parallel.shard_loads(
                jax.device_put(jnp.asarray(index), tokens),
                num_experts,
                mesh,
                STRATEGIES[strategy][1],
            )
        )  # [groups, shards]
    return float(np.max(loads.max(axis=1) / loads.mean(axis=1)))


def relative_difference(result, reference) -> float:
    """max |result - reference| over max |reference|, over the loss and every gradient."""
    pairs = zip(jax.tree.leaves(result), jax.tree.leaves(reference), strict=True)
    worst = 0.0
    for got, want in pairs:
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        worst = max(worst, float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)))
    return worst


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exchange", choices=("both", "ragged", "padded"), default="both")
    parser.add_argument(
        "--strategies",
        nargs="+",
        choices=tuple(STRATEGIES),
        default=["expert_parallel"],
        help="dispatch strategies to time (default: expert_parallel)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small shapes, a smoke test")
    args = parser.parse_args()
    backend, devices = jax.default_backend(), jax.devices()
    print(f"jax {jax.__version__}, backend {backend}: {len(devices)} x {devices[0].device_kind}")
    if len(devices) < 2:
        print(f"summary: skipped: needs >= 2 devices, found {len(devices)}")
        return
    exchanges = ("ragged", "padded") if args.exchange == "both" else (args.exchange,)
    if backend == "cpu" and "ragged" in exchanges:
        parser.error(
            "--exchange: ragged_all_to_all is not implemented on XLA:CPU; use --exchange padded"
        )
    shape = pick_shape(backend, args.quick)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "expert": len(devices), "tensor": 1})
    num_experts = shape.experts_per_device * len(devices)
    num_tokens = shape.tokens_per_device * len(devices)
    print(
        f"mesh expert={len(devices)}; tokens {num_tokens}, d_model {shape.d_model}, d_ff "
        f"{shape.d_ff}, experts {num_experts}, top_k {TOP_K}, {jnp.dtype(shape.dtype).name}, "
        f"forward+backward, median of {args.repeats}"
    )
    header = ("routing", "strategy", "exchange", "load max/mean", "step ms", "vs padded",
              "max diff vs padded")  # fmt: skip
    rows, summary, worst = [], [], 0.0
    for kind in ("uniform", "zipf"):
        index = expert_choices(kind, num_tokens, num_experts)
        for strategy in args.strategies:
            load = f"{load_ratio(mesh, index, num_experts, strategy):.2f}"
            measured = {
                exchange: measure(mesh, shape, index, exchange, strategy, args.repeats)
                for exchange in exchanges
            }
            label = kind if len(args.strategies) == 1 else f"{kind}/{strategy}"
            for exchange, (seconds, result) in measured.items():
                versus = diff = ""
                if exchange != "padded" and "padded" in measured:
                    padded_seconds, padded_result = measured["padded"]
                    difference = relative_difference(result, padded_result)
                    worst = max(worst, difference)
                    versus, diff = f"{seconds / padded_seconds:.2f}x", f"{difference:.1e}"
                cells = (kind, strategy, exchange, load, f"{seconds * 1e3:.2f}", versus, diff)
                rows.append(cells)
                note = f" ({versus} padded's time, diff {diff})" if versus else ""
                summary.append(f"{label} {exchange} {seconds * 1e3:.2f} ms{note}")
    print_table(header, rows)
    print("summary: " + "; ".join(summary))
    tolerance = TOLERANCE[jnp.dtype(shape.dtype).name]
    if worst > tolerance:
        raise SystemExit(
            f"the exchanges disagree: relative difference {worst:.1e} > {tolerance:.0e}"
        )


if __name__ == "__main__":
    main()
