"""Which platform a kernel is being traced for.

`jax.default_backend()` names where this process runs arrays, which is not always where the code
being traced will run: a step compiled ahead of time for a TPU topology on a CPU machine
(`moejax.parallel.aot`) is traced with CPU as the default backend but for TPU devices. The devices
of
the mesh the code is traced under say which, so implementation choices ("auto") and the
"pallas" refusal on CPU follow the mesh when there is one.
"""

import jax


def target_platform() -> str:
    """ "tpu", "gpu" or "cpu": the platform of the ambient mesh's devices (set by `jax.set_mesh`
    or `jax.sharding.use_abstract_mesh`, and inside `jax.shard_map`), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        device = mesh.abstract_device
        if device is not None and device.platform:
            return device.platform
    return jax.default_backend()
