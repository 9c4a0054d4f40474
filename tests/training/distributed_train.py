"""`train.py` in a process that has initialised `jax.distributed` (one process, coordinator on
localhost): the multihost code path, where JAX's preemption notifier owns SIGTERM and Orbax's
`reached_preemption` agrees the step to stop at.

Usage: python distributed_train.py PORT [train.py arguments ...]
"""

import runpy
import sys
from pathlib import Path

import jax

if __name__ == "__main__":
    port, arguments = sys.argv[1], sys.argv[2:]
    jax.distributed.initialize(f"localhost:{port}", num_processes=1, process_id=0)
    train_py = Path(__file__).resolve().parents[2] / "train.py"
    sys.argv = [str(train_py), *arguments]
    runpy.run_path(str(train_py), run_name="__main__")
