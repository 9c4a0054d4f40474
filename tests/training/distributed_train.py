"""`train.py` in a process whose launcher has initialised `jax.distributed` before it (one
process, coordinator on localhost), as a user's own launcher script would: JAX's preemption
notifier has claimed SIGTERM by the time train.py installs its handlers.

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
