"""glibc malloc settings that stop XLA:CPU from page-faulting its temporaries on every call.

XLA:CPU allocates an executable's temporaries with malloc on every call and frees them after.
The default job's train step asks for one 508 MiB block. glibc serves a block that large with
a fresh mmap (anything over its mmap threshold, at most 32 MiB by default) and unmaps it on
free, so every step faults in 130,000 new 4 KiB pages and spends a quarter of its CPU time in
the kernel. Served from the heap instead, the block is reused from step to step.

Three settings are needed, each measured on its own (`benchmarks/train_throughput.py`):
- `M_MMAP_THRESHOLD` 1 GiB: blocks below it come from the heap; larger ones (a checkpoint's
  host buffers on a TPU or GPU host) are still mapped and given back to the OS when freed.
  `M_MMAP_MAX=0` (no mmap at all) would keep those in the heap too.
- `M_TRIM_THRESHOLD` -1: the heap is never shrunk, so it stays at its high-water mark. Setting
  either threshold switches off glibc's own adjustment of the other, and the 128 KiB trim
  threshold left would shrink and regrow the heap every step, as many faults as before; a
  large finite one (1 GiB) still shrinks it whenever two steps' temporaries were live at once
  and both are freed, in some runs every step.
- `M_ARENA_MAX` 1: XLA runs the step on its own threads, and a thread arena's heaps are at most
  64 MiB, so a large block in one is mapped whatever the threshold. The threads then share one
  arena's lock.

The arena limit holds only for threads that have no arena yet, and XLA's threads take theirs
when JAX starts its backend (the first device query or array), so the settings must come
before that. They change the whole process, so the library never applies them: importing
moejax (or JAX) starts no backend and calls no `mallopt`. The programs do, first thing when run
(`train.py`, `eval.py`, the benchmarks that time train steps), the way a launcher sets
`GLIBC_TUNABLES`.
`MOEJAX_MALLOC_TUNING=0` keeps glibc's defaults; so does any `glibc.malloc.*` entry in
`GLIBC_TUNABLES`, which is the user's own choice. Elsewhere than glibc (macOS, musl) nothing
happens and `MallocTuning.reason` says why.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os

OPT_OUT_VARIABLE = "MOEJAX_MALLOC_TUNING"

# From glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

NEVER = -1  # as M_TRIM_THRESHOLD: glibc reads it as the largest size
SETTINGS = {M_MMAP_THRESHOLD: 1 << 30, M_TRIM_THRESHOLD: NEVER, M_ARENA_MAX: 1}


@dataclasses.dataclass(frozen=True)
class MallocTuning:
    """What `tune_malloc` did: `applied` is True when every setting was accepted."""

    applied: bool
    reason: str


def glibc_version() -> str | None:
    """ "glibc 2.36" on glibc, None elsewhere."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or None
    except (AttributeError, ValueError, OSError):  # no confstr (Windows), or not glibc
        return None


def tune_malloc(environ: dict[str, str] | None = None) -> MallocTuning:
    """Applies `SETTINGS` through glibc's `mallopt`, unless opted out or not on glibc."""
    environ = os.environ if environ is None else environ
    if environ.get(OPT_OUT_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off"):
        value = environ[OPT_OUT_VARIABLE]
        return MallocTuning(False, f"{OPT_OUT_VARIABLE}={value} asks for glibc's defaults")
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        return MallocTuning(False, "GLIBC_TUNABLES already sets glibc.malloc parameters")
    libc_version = glibc_version()
    if libc_version is None:
        return MallocTuning(False, "not glibc (mallopt's parameters are glibc's)")
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    refused = [name for name, value in SETTINGS.items() if mallopt(name, value) != 1]
    if refused:
        return MallocTuning(False, f"{libc_version} refused mallopt parameters {refused}")
    return MallocTuning(True, f"{libc_version}: mallopt {SETTINGS}")
