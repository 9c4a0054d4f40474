"""`train.py` with a fault injected into this one process, the way a single bad host sees it.

Usage: python one_process_fault.py FAULT [train.py arguments ...]

FAULT is one of
- `unreadable:STEP`: reading checkpoint STEP fails here, inside Orbax's read and before its
  barrier, where a shard that only this host reads (a damaged file, a failing disk) fails;
- `unlisted:STEP`: this process does not see checkpoint STEP in the checkpoint directory (a
  host whose view of a shared filesystem lags, or that has a directory of its own);
- `data_ahead`: this process's training iterator has taken one batch more than the others'
  (a host whose input pipeline drifted).
"""

import runpy
import sys
from pathlib import Path

import orbax.checkpoint as ocp

from moejax.training import corpus


def unreadable(step: str) -> None:
    read = ocp.Checkpointer._restore

    def failing_read(self, directory, *args, **kwargs):
        if Path(directory).name == step:
            raise OSError(f"injected fault: this host cannot read {directory}")
        return read(self, directory, *args, **kwargs)

    ocp.Checkpointer._restore = failing_read


def unlisted(step: str) -> None:
    listed = ocp.CheckpointManager.all_steps

    def lagging(self, *args, **kwargs):
        return [s for s in listed(self, *args, **kwargs) if s != int(step)]

    ocp.CheckpointManager.all_steps = lagging


def data_ahead() -> None:
    for name in ("train_iterator", "resumed_train_iterator"):
        make = getattr(corpus, name)

        def ahead(*args, make=make, **kwargs):
            iterator = make(*args, **kwargs)
            next(iterator)
            return iterator

        setattr(corpus, name, ahead)


if __name__ == "__main__":
    fault, arguments = sys.argv[1], sys.argv[2:]
    name, _, argument = fault.partition(":")
    faults = {
        "unreadable": lambda: unreadable(argument),
        "unlisted": lambda: unlisted(argument),
        "data_ahead": data_ahead,
    }
    faults[name]()
    train_py = Path(__file__).resolve().parents[2] / "train.py"
    sys.argv = [str(train_py), *arguments]
    runpy.run_path(str(train_py), run_name="__main__")
