"""One process of a 2-process restore: joins the distributed system, restores a run's checkpoint
onto an 8-device mesh whose expert shards are on different processes, and (process 0) writes
every leaf, gathered whole, to an .npz file.

Usage: python restore_worker.py PORT PROCESS_ID WORKDIR STEP OUT.npz [mesh.axis=size ...]
"""

import sys

import numpy as np

from moejax.parallel import distributed

if __name__ == "__main__":
    port, process_id, workdir, step, out = sys.argv[1:6]
    distributed.initialize(distributed.plan(f"localhost:{port}", 2, int(process_id)))

    import jax

    from moejax import config as config_lib
    from moejax.parallel import sharding
    from moejax.training import state as state_lib
    from moejax.training.restore import read_run, restore_checkpoint

    config = config_lib.apply_overrides(read_run(workdir), sys.argv[6:])
    # Devices interleaved by process, so that the innermost mesh axis (the experts, here) pairs a
    # device of process 0 with one of process 1: no process restores the whole checkpoint.
    per_process = [[d for d in jax.devices() if d.process_index == p] for p in range(2)]
    devices = [device for pair in zip(*per_process, strict=True) for device in pair]
    mesh = sharding.make_mesh(config_lib.validate(config, len(devices)), devices)
    layout = state_lib.state_layout(config, mesh)
    target = layout.restore_target()
    state = restore_checkpoint(workdir, config, target, step=int(step)).state
    split = 0  # leaves no process holds whole
    for leaf, wanted in zip(jax.tree.leaves(state), jax.tree.leaves(target), strict=True):
        assert leaf.sharding.is_equivalent_to(wanted.sharding, leaf.ndim), (leaf.sharding, wanted)
        held = sum(shard.data.size for shard in leaf.addressable_shards if shard.replica_id == 0)
        split += 0 < held < leaf.size
    assert split, "the mesh put a whole copy of the state on each process"
    whole = sharding.to_host(state)
    if jax.process_index() == 0:
        leaves = jax.tree_util.tree_leaves_with_path(whole)
        np.savez(out, **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves})
