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
processes on one machine. A stop signal to any one process becomes a stop that every process
takes at the same step (`training.preemption`, over the coordination service below).

Processes that disagree stop together, with one line that says how. Before a step that every
process must take alike (the first collective, a checkpoint), they exchange what they must agree
on through the coordination service's key-value store (`gather`, no device collective): their
resolved config and code (`code_version`) at start-up, the data-iterator state at a save, whether
a checkpoint reads. An `Agreement` turns a difference, or an error in one process, into the same
`DistributedError` on every process. Without it the others would go on alone into a collective
that one of them never joins, and wait there for the distributed system's timeouts or abort in
gloo with a C++ stack trace that names nothing.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (nothing in a single process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# How long a process waits for the others to reach an exchange: as long as JAX waits for every
# process to join the distributed system (`jax.distributed.initialize`'s default).
EXCHANGE_TIMEOUT_S = 300.0

# Exchanges this process has made, by name. Every process makes the same exchanges in the same
# order, so the n-th exchange of a name has the same keys on all of them.
_exchanges: collections.Counter[str] = collections.Counter()


def _coordination():
    """JAX's distributed state when this process is one of several, else None."""
    # JAX has no public handle on its coordination service's client; Orbax and
    # jax.experimental.multihost_utils read it here too.
    from jax._src import distributed as jax_distributed

    state = jax_distributed.global_state
    if state.client is None or (state.num_processes or 1) < 2:
        return None
    return state


@dataclasses.dataclass(frozen=True)
class Coordination:
    """This process's handle on the coordination service of a run of several processes: the
    key-value store and barriers every process reaches without a device collective."""

    client: Any  # JAX's DistributedRuntimeClient
    process_id: int
    num_processes: int


def coordination() -> Coordination | None:
    """The coordination service when this process is one of several, else None."""
    state = _coordination()
    if state is None:
        return None
    return Coordination(state.client, state.process_id, state.num_processes)


def unique_key(name: str) -> str:
    """A key prefix for the next use of `name` that every process computes alike (each makes
    the same uses in the same order)."""
    _exchanges[name] += 1
    return f"moejax/{name}/{_exchanges[name]}"


def publish(name: str, text: str) -> None:
    """Puts this process's `text` of the exchange `name` where the others' `gather` reads it,
    without waiting for theirs: what a process that is about to stop tells the others."""
    state = _coordination()
    if state is not None:
        state.client.key_value_set(f"{unique_key(name)}/{state.process_id}", text)


def gather(name: str, text: str, *, timeout_s: float = EXCHANGE_TIMEOUT_S) -> list[str]:
    """Every process's `text` of the exchange `name`, by process id; `[text]` in one process.

    Each process puts its own in the coordination service's key-value store and reads the
    others': no device collective, so it works before any backend starts and whatever the
    processes' devices. Every process makes the same exchanges in the same order (through
    `gather` or `publish`). A process whose text is not there within `timeout_s` is a
    `DistributedError` naming it.
    """
    state = _coordination()
    if state is None:
        return [text]
    import jax

    key = unique_key(name)
    state.client.key_value_set(f"{key}/{state.process_id}", text)
    deadline = time.monotonic() + timeout_s
    texts = []
    for process in range(state.num_processes):
        wait_ms = max(1, int(1000 * (deadline - time.monotonic())))
        try:
            texts.append(state.client.blocking_key_value_get(f"{key}/{process}", wait_ms))
        except jax.errors.JaxRuntimeError as error:
            if "DEADLINE_EXCEEDED" not in str(error):
                raise
            raise DistributedError(
                f"{name}: process {process} did not get there within {timeout_s:.0f} s; it "
                "stopped before (its log says why) or runs other code"
            ) from None
    return texts


class _Absent:
    """The value of a field that one process has and another has not."""

    def __repr__(self) -> str:
        return "nothing"


ABSENT = _Absent()


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """The leaves of `value`, nested dataclasses and mappings, by dotted path: a `Config` gives
    `{"model.moe.num_experts": 4, ...}`; anything else is one leaf, at `prefix`."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
    elif isinstance(value, Mapping):
        items = list(value.items())
    else:
        return {prefix: value}
    flat = {}
    for name, item in items:
        flat.update(flatten(item, f"{prefix}.{name}" if prefix else str(name)))
    return flat


def differences(values: Sequence[Any]) -> dict[str, list[Any]]:
    """The leaves (`flatten`) that are not the same in all of `values` (one per process), each
    with every process's value (`ABSENT` where one lacks it), in the order they first appear."""
    flats = [flatten(value) for value in values]
    paths = dict.fromkeys(path for flat in flats for path in flat)
    found = {}
    for path in paths:
        per_process = [flat.get(path, ABSENT) for flat in flats]
        if any(value != per_process[0] for value in per_process[1:]):
            found[path] = per_process
    return found


def _process_list(processes: list[int]) -> str:
    """`process 3`, `processes 0, 2`, `processes 0-5, 7` (runs of three or more as ranges)."""
    if len(processes) == 1:
        return f"process {processes[0]}"
    runs: list[list[int]] = []
    for process in processes:
        if runs and process == runs[-1][-1] + 1:
            runs[-1].append(process)
        else:
            runs.append([process])
    parts = [f"{run[0]}-{run[-1]}" if len(run) > 2 else ", ".join(map(str, run)) for run in runs]
    return f"processes {', '.join(parts)}"


def describe_differences(found: dict[str, list[Any]], limit: int = 8) -> str:
    """`differences` in one line: `model.moe.num_experts: process 0 has 4, process 1 has 8;
    ...`, the processes that agree on a value named together, at most `limit` fields."""
    parts = []
    for path, per_process in list(found.items())[:limit]:
        groups: list[tuple[Any, list[int]]] = []
        for process, value in enumerate(per_process):
            group = next((g for g in groups if g[0] == value), None)
            if group is None:
                groups.append((value, [process]))
            else:
                group[1].append(process)
        said = ", ".join(
            f"{_process_list(members)} {'has' if len(members) == 1 else 'have'} {value!r}"
            for value, members in groups
        )
        parts.append(f"{path}: {said}")
    if len(found) > limit:
        parts.append(f"and {len(found) - limit} more")
    return "; ".join(parts)


def _summary(error: BaseException) -> str:
    """What another process is told of the error that stopped this one: a `UserError`'s whole
    message as `report_user_errors` prints it, else the exception's type and first line."""
    if isinstance(error, UserError):
        return f"{error.label}: {error}"
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


class Agreement:
    """A stretch every process goes through before the next step they must take alike, which
    ends the same way on all of them (a context manager; only the block, in one process).

    Inside the block each process does its part (resolves its config, takes a lock) and names
    with `compare` what must be the same everywhere. On leaving it the processes exchange one
    line each (`gather`): the values to compare, or the error that ended this process's block.
    Any difference, or an error in another process, raises `DistributedError` on every process,
    naming each differing field with every process's value, or the process and its error; an
    error in this process's block propagates once the others are told. `remedy` is the sentence
    a difference message ends with: what to make equal.
    """

    def __init__(self, name: str, *, remedy: str = ""):
        self.name, self.remedy = name, remedy
        self._values: dict[str, dict[str, Any]] = {}

    def compare(self, what: str, values: Any) -> None:
        """Adds `values` (nested dataclasses or mappings, compared leaf by leaf) to what must be
        equal on every process, under the name a difference is reported by (`config`)."""
        self._values[what] = flatten(values)

    def __enter__(self) -> Agreement:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if _coordination() is None:
            return
        if error is not None:
            publish(self.name, json.dumps({"error": _summary(error)}))
            return
        entries = [
            json.loads(text)
            for text in gather(self.name, json.dumps({"values": self._values}, default=repr))
        ]
        stopped = [
            f"process {process} stopped: {entry['error']}"
            for process, entry in enumerate(entries)
            if "error" in entry
        ]
        if stopped:
            raise DistributedError(f"{self.name}: {'; '.join(stopped)}")
        problems = []
        for what in self._values:
            found = differences([entry["values"].get(what, {}) for entry in entries])
            if found:
                problems.append(f"{what} differs between processes: {describe_differences(found)}")
        if problems:
            remedy = f". {self.remedy}" if self.remedy else ""
            raise DistributedError("; ".join(problems) + remedy)


# The libraries whose versions decide what a step computes and how a checkpoint is written.
_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain")
_PACKAGES = ("moejax", "kernels_pallas")


@functools.cache
def code_version() -> dict[str, str]:
    """What this process runs: a digest of each source file of moejax and kernels_pallas, by its
    path (`moejax/moe.py`: the first 12 hex digits of its SHA-256), and the versions of the
    libraries in `_LIBRARIES`. Alike from a checkout (clean or not) and from an installed wheel,
    and a difference names the file."""
    version = {}
    for package in _PACKAGES:
        spec = importlib.util.find_spec(package)
        for location in spec.submodule_search_locations or ():
            root = Path(location)
            for path in sorted(root.rglob("*.py")):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
                version[f"{package}/{path.relative_to(root).as_posix()}"] = digest
    for library in _LIBRARIES:
        try:
            version[library] = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            version[library] = "not installed"
    return version
