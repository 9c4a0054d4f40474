"""Several processes, one run: when and how `train.py` and `eval.py` call
`jax.distributed.initialize`.

A multi-host TPU slice or a multi-node GPU job runs one Python process per host (per GPU, under
SLURM's usual one task per GPU). Until they join one distributed system each process sees only
its own devices and would train alone on its own data, so the scripts join it first, before
anything asks JAX for devices:

- explicit: `--coordinator_address HOST:PORT --num_processes N --process_id I` on every
  process (the same address and count everywhere, a different id);
- Cloud TPU: on a TPU VM (its accelerator device files present) JAX finds the slice's workers
  and the coordinator in the VM metadata;
- SLURM: inside `srun` with more than one task JAX reads the job's node list and task ids;
- otherwise one process, with no distributed system at all.

On CPU the processes' collectives go over gloo (TCP), which is how the tests run several
processes on one machine. Once the system is up, JAX's preemption notifier owns SIGTERM: a
signal to any one process becomes a stop that every process takes at the same step
(`training.preemption`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from moejax.errors import UserError

# Files a Cloud TPU VM has and other machines do not: the TPU chips (v4 and later as accel*,
# v2/v3 through vfio).
_TPU_DEVICE_FILES = ("/dev/accel0", "/dev/vfio/0")


class DistributedError(UserError):
    """The flags for several processes do not describe a possible layout."""

    label = "distributed error"


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins the run: `kind` is "explicit", "cloud_tpu", "slurm" or "single";
    the three fields are set for "explicit" only (the cluster kinds let JAX find them)."""

    kind: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def add_flags(parser) -> None:
    """The explicit-launch flags of train.py and eval.py."""
    parser.add_argument(
        "--coordinator_address",
        default=None,
        help="HOST:PORT of process 0, the same on every process (several processes without "
        "Cloud TPU or SLURM detection)",
    )
    parser.add_argument(
        "--num_processes", type=int, default=None, help="how many processes take part"
    )
    parser.add_argument("--process_id", type=int, default=None, help="this process, 0-based")
    parser.add_argument(
        "--single_process",
        action="store_true",
        help="never join a distributed system, even where a cluster is detected",
    )


def detect(environ: Mapping[str, str] | None = None, *, tpu_vm: bool | None = None) -> str:
    """The cluster this process was launched in: "cloud_tpu", "slurm" or "single".

    SLURM counts only inside a job step with more than one task (`srun -n 2 ...`); a batch
    script's own shell, or a one-task step, is a single process.
    """
    environ = os.environ if environ is None else environ
    if tpu_vm is None:
        tpu_vm = any(Path(path).exists() for path in _TPU_DEVICE_FILES)
    # Set by tests and ahead-of-time compilation on machines that only pretend to be a TPU host.
    if tpu_vm and "TPU_SKIP_MDS_QUERY" not in environ:
        return "cloud_tpu"
    tasks = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS")
    if "SLURM_JOB_ID" in environ and "SLURM_PROCID" in environ and tasks and int(tasks) > 1:
        return "slurm"
    return "single"


def plan(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    *,
    single_process: bool = False,
    environ: Mapping[str, str] | None = None,
    tpu_vm: bool | None = None,
) -> Launch:
    """How to launch from the flags (checked here, naming the flag) and the environment."""
    explicit = {
        "--coordinator_address": coordinator_address,
        "--num_processes": num_processes,
        "--process_id": process_id,
    }
    given = [flag for flag, value in explicit.items() if value is not None]
    if single_process:
        if given:
            raise DistributedError(
                f"--single_process with {', '.join(given)}: give one or the other"
            )
        return Launch("single")
    if not given:
        return Launch(detect(environ, tpu_vm=tpu_vm))
    missing = [flag for flag, value in explicit.items() if value is None]
    if missing:
        raise DistributedError(
            f"{', '.join(given)} given without {', '.join(missing)}: an explicit launch needs "
            "all three on every process"
        )
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(
            f"--coordinator_address {coordinator_address!r}: expected HOST:PORT with a port in "
            "1..65535, the address of process 0 that every process can reach"
        )
    if num_processes < 1:
        raise DistributedError(f"--num_processes {num_processes}: must be at least 1")
    if not 0 <= process_id < num_processes:
        raise DistributedError(
            f"--process_id {process_id}: must be in [0, --num_processes={num_processes})"
        )
    return Launch("explicit", coordinator_address, num_processes, process_id)


def initialize(launch: Launch) -> None:
    """Joins the distributed system `launch` describes (nothing for "single" or an explicit
    single process); call before anything asks JAX for devices. Blocks until every process
    has joined (JAX's initialization timeout, 5 minutes)."""
    if launch.kind == "single" or (launch.kind == "explicit" and launch.num_processes == 1):
        return
    import jax

    if jax.distributed.is_initialized():
        return  # A launcher (or a notebook) joined already.
    if launch.kind == "explicit":
        jax.distributed.initialize(
            coordinator_address=launch.coordinator_address,
            num_processes=launch.num_processes,
            process_id=launch.process_id,
        )
    else:
        # JAX's own detection reads the TPU metadata server or SLURM's variables.
        jax.distributed.initialize()


def initialize_from_flags(args) -> Launch:
    """`plan` of parsed `add_flags` arguments, then `initialize`; returns the plan."""
    launch = plan(
        args.coordinator_address,
        args.num_processes,
        args.process_id,
        single_process=args.single_process,
    )
    initialize(launch)
    return launch


def all_processes(flag: bool) -> bool:
    """Whether `flag` holds on every process (a collective: every process must call it);
    `flag` itself in a single process."""
    import jax

    if jax.process_count() == 1:
        return flag
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (nothing in a single process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def all_processes_equal(text: str) -> bool:
    """Whether every process passed the same `text` (a collective, by digest)."""
    import jax

    if jax.process_count() == 1:
        return True
    import hashlib

    import numpy as np
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint32)  # [8]
    digests = multihost_utils.process_allgather(digest)  # [processes, 8]
    return bool(np.all(digests == digests[:1]))
