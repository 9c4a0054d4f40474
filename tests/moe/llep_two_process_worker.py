"""One of the two processes of tests/moe/test_llep_two_process.py: joins the other over
`jax.distributed`, builds a mesh over both processes' 4 CPU devices each, and checks that LLEP
gives plain expert parallelism's outputs and gradients when the exchanges cross processes (gloo,
JAX's default CPU collectives), and that its loads stay within the margin.

    python tests/moe/llep_two_process_worker.py PORT PROCESS_ID

Prints one JSON line (the largest differences and the loads) and exits 0 when every check holds.
"""

import json
import sys

TOKENS, D_MODEL, D_FF, NUM_EXPERTS, TOP_K = 256, 16, 32, 16, 2
MARGIN, MAX_FOREIGN = 0.1, 4
# Meshes lay devices out process by process, so the expert axis crosses the processes only when
# no axis before it splits them: with (2, 1, 4, 1) each process would hold one expert group and
# exchange within itself, as the one-process meshes of tests/moe/test_llep.py do.
MESHES = ((1, 1, 8, 1),)


def _inputs():
    """x, params, weights, index: the same on both processes, skewed to experts 0 and 1."""
    import numpy as np

    rng = np.random.default_rng(0)
    params = {
        "w_gate": rng.normal(size=(NUM_EXPERTS, D_MODEL, D_FF)) / D_MODEL**0.5,
        "w_up": rng.normal(size=(NUM_EXPERTS, D_MODEL, D_FF)) / D_MODEL**0.5,
        "w_down": rng.normal(size=(NUM_EXPERTS, D_FF, D_MODEL)) / D_FF**0.5,
    }
    x = rng.normal(size=(TOKENS, D_MODEL))
    # Seven of eight tokens choose experts 0 and 1 (expert shard 0), the rest at random.
    first = np.where(np.arange(TOKENS) % 8, rng.integers(0, 2, TOKENS), rng.integers(2, 16, TOKENS))
    second = np.where(first < 2, 1 - first, (first + 1) % NUM_EXPERTS)
    index = np.stack([first, second], axis=1).astype(np.int32)
    weights = rng.dirichlet(np.ones(TOP_K), TOKENS)
    as32 = {name: value.astype(np.float32) for name, value in params.items()}
    return x.astype(np.float32), as32, weights.astype(np.float32), index


def _check(shape) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from expert_mesh import mesh_of, step_shardings
    from jax.experimental import multihost_utils

    from moejax.moe import expert_parallel, llep
    from moejax.parallel import sharding

    mesh = mesh_of(shape)
    tokens, weight_shardings = step_shardings(mesh)
    x, params, weights, index = _inputs()
    placed = [
        jax.make_array_from_callback(value.shape, where, lambda at, value=value: value[at])
        for value, where in zip(
            (x, *params.values(), weights, index),
            (tokens, *weight_shardings.values(), tokens, tokens),
            strict=True,
        )
    ]
    x_g, params_g = placed[0], dict(zip(params, placed[1:4], strict=True))
    weights_g, index_g = placed[4], placed[5]

    def loss(x, params, weights, index, balance):
        mesh = sharding.kernel_mesh()
        y = expert_parallel.sharded_dropless(x, index, weights, params, mesh, balance=balance)
        probe = jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))
        return jnp.sum(y * probe), y

    balances = {"plain": expert_parallel.PLAIN, "llep": llep.llep_balance(MARGIN, MAX_FOREIGN)}
    results = {}
    with jax.set_mesh(mesh):
        for name, balance in balances.items():
            step = jax.value_and_grad(
                functools.partial(loss, balance=balance), argnums=(0, 1, 2), has_aux=True
            )
            out = jax.jit(step)(x_g, params_g, weights_g, index_g)
            results[name] = multihost_utils.process_allgather(out, tiled=True)

        def count(index):
            return {
                f"{name}_loads": expert_parallel.shard_loads(index, NUM_EXPERTS, mesh, balance)
                for name, balance in balances.items()
            }

        loads = jax.jit(count)(index_g)
        results.update(multihost_utils.process_allgather(loads, tiled=True))

    differences = jax.tree.map(
        lambda a, b: float(np.max(np.abs(a - b) / (2e-5 + 2e-5 * np.abs(b)))),
        results["llep"],
        results["plain"],
    )
    worst = max(jax.tree.leaves(differences))
    loads, plain = np.asarray(results["llep_loads"]), np.asarray(results["plain_loads"])
    shards = shape[2]
    mean = plain.sum(axis=1) / shards
    cap = [int(llep.load_cap(int(total), shards, MARGIN)) for total in plain.sum(axis=1)]
    report = {
        "shape": shape,
        "process_count": jax.process_count(),
        "devices": jax.device_count(),
        "worst_relative_to_tolerance": worst,
        "llep_loads": loads.tolist(),
        "plain_loads": plain.tolist(),
        "cap": cap,
    }
    assert worst <= 1.0, report
    assert np.all(loads.max(axis=1) <= np.ceil((1 + MARGIN) * mean)), report
    assert np.all(plain.max(axis=1) > 2 * mean), report
    return report


def main(port: int, process_id: int) -> None:
    import jax

    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id
    )
    reports = [_check(shape) for shape in MESHES]
    print(json.dumps(reports), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
