"""One process of a 2-process restore: joins the distributed system, restores a run's checkpoint
onto an 8-device mesh spanning both processes, and (process 0) writes every leaf, gathered whole,
to an .npz file.

Usage: python restore_worker.py PORT PROCESS_ID WORKDIR STEP OUT.npz [mesh.axis=size ...]
"""

import sys

import numpy as np

from moejax import distributed

if __name__ == "__main__":
    port, process_id, workdir, step, out = sys.argv[1:6]
    distributed.initialize(distributed.plan(f"localhost:{port}", 2, int(process_id)))

    import jax

    from moejax import config as config_lib
    from moejax import sharding
    from moejax.training import state as state_lib
    from moejax.training.restore import read_run, restore_checkpoint

    config = config_lib.apply_overrides(read_run(workdir), sys.argv[6:])
    mesh = sharding.make_mesh(config_lib.validate(config, jax.device_count()), jax.devices())
    layout = state_lib.state_layout(config, mesh)
    target = layout.restore_target()
    state = restore_checkpoint(workdir, config, target, step=int(step)).state
    for leaf, wanted in zip(jax.tree.leaves(state), jax.tree.leaves(target), strict=True):
        assert leaf.sharding.is_equivalent_to(wanted.sharding, leaf.ndim), (leaf.sharding, wanted)
        assert not leaf.is_fully_addressable or leaf.sharding.is_fully_replicated
    whole = sharding.to_host(state)
    if jax.process_index() == 0:
        leaves = jax.tree_util.tree_leaves_with_path(whole)
        np.savez(out, **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves})
