"""moejax.training.allocator: glibc's mallopt really takes the settings, and a large block that
is freed and allocated again, the pattern of XLA:CPU's temporaries, stops page-faulting;
train.py and eval.py start with them, and importing moejax leaves glibc's malloc alone."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moejax.training import allocator

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 64 << 20  # above glibc's largest default mmap threshold (32 MiB) and a thread heap
PAGES = BLOCK // 4096
on_glibc = pytest.mark.skipif(
    allocator.glibc_version() is None, reason="mallopt's parameters are glibc's"
)

# Prints the minor page faults of one malloc / touch / free of BLOCK bytes (the mean over ten,
# after one to warm up), run on a new thread as XLA runs a step.
FAULTS_PER_BLOCK = textwrap.dedent(
    f"""
    import ctypes, resource, threading

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

    def once():
        block = libc.malloc({BLOCK})
        libc.memset(block, 1, {BLOCK})
        libc.free(block)

    def run():
        once()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            once()
        faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)

    faults = []
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    print("faults per block:", faults[0])
    """
)


def _run(script: str, variables: dict[str, str] | None = None) -> list[str]:
    """The lines `script` prints, run in a new Python process from the repository root."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(variables or {})}
    env.pop("GLIBC_TUNABLES", None)
    child = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert child.returncode == 0, child.stderr
    return child.stdout.strip().splitlines()


def _faults_per_block(prelude: str, variables: dict[str, str] | None = None) -> float:
    lines = _run(prelude + FAULTS_PER_BLOCK, variables)
    return float(next(line for line in lines if line.startswith("faults per block:")).split()[-1])


# The settings alone, as the programs apply them.
TUNED = textwrap.dedent(
    """
    import os
    from moejax.training import allocator
    tuning = allocator.tune_malloc()
    assert tuning.applied == (os.environ.get("MOEJAX_MALLOC_TUNING") != "0"), tuning
    """
)


@on_glibc
def test_every_setting_is_accepted_by_mallopt():
    tuning = allocator.tune_malloc({})
    assert tuning.applied and tuning.reason.startswith("glibc"), tuning


@on_glibc
def test_a_freed_large_block_is_reused_without_page_faults_once_tuned():
    tuned = _faults_per_block(TUNED)
    untuned = _faults_per_block(TUNED, {allocator.OPT_OUT_VARIABLE: "0"})
    # glibc's defaults map a fresh block every time: a fault per page.
    assert untuned > 0.9 * PAGES, untuned
    assert tuned < 0.01 * PAGES, tuned


# malloc and free without touching the memory (no faults, no resident memory), reading the
# heap's end (sbrk(0)) around them.
HEAP_END = textwrap.dedent(
    """
    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype = libc.sbrk.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.sbrk.argtypes = [ctypes.c_ssize_t]
    start = libc.sbrk(0)
    blocks = [libc.malloc(600 << 20) for _ in range(2)]
    grown = libc.sbrk(0)
    for block in blocks:
        libc.free(block)
    after_free = libc.sbrk(0)
    huge = libc.malloc(3 << 29)
    after_huge = libc.sbrk(0)
    libc.free(huge)
    print(grown - start, after_free - grown, after_huge - after_free)
    """
)


@on_glibc
def test_the_heap_serves_blocks_below_a_gib_keeps_them_and_maps_larger_ones():
    child = subprocess.run(
        [sys.executable, "-c", TUNED + HEAP_END], cwd=ROOT, capture_output=True, text=True
    )
    assert child.returncode == 0, child.stderr
    grown, shrunk_by_free, grown_by_huge = map(int, child.stdout.split())
    assert grown > 1 << 30  # from the heap, not mapped
    # Freeing 1.2 GiB at the top of the heap leaves it where it was (no trimming) ...
    assert shrunk_by_free == 0
    # ... and 1.5 GiB is mapped, so it goes back to the OS when freed.
    assert grown_by_huge == 0


@pytest.mark.parametrize(
    "environ, reason",
    [
        ({"MOEJAX_MALLOC_TUNING": "0"}, "MOEJAX_MALLOC_TUNING=0 asks for glibc's defaults"),
        ({"MOEJAX_MALLOC_TUNING": "off"}, "MOEJAX_MALLOC_TUNING=off asks for glibc's defaults"),
        (
            {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"},
            "GLIBC_TUNABLES already sets glibc.malloc parameters",
        ),
    ],
)
def test_an_opt_out_leaves_glibc_alone_and_says_why(environ, reason):
    assert allocator.tune_malloc(environ) == allocator.MallocTuning(False, reason)


# Records every lookup of `mallopt` through ctypes, and whether JAX's backend had started by
# then: the only way Python code reaches glibc's malloc parameters (short of GLIBC_TUNABLES in
# a child's environment, checked apart).
MALLOPT_SPY = textwrap.dedent(
    """
    import ctypes, sys

    mallopt_lookups = []

    class SpyCDLL(ctypes.CDLL):
        def __getitem__(self, name):  # CDLL.__getattr__ comes here too
            if name == "mallopt":
                bridge = sys.modules.get("jax._src.xla_bridge")
                mallopt_lookups.append(bool(bridge and bridge.backends_are_initialized()))
            return super().__getitem__(name)

    ctypes.CDLL = SpyCDLL
    ctypes.cdll = ctypes.LibraryLoader(SpyCDLL)
    """
)


@on_glibc
def test_importing_moejax_changes_no_malloc_setting():
    lines = _run(
        MALLOPT_SPY
        + textwrap.dedent(
            """
            import os
            tunables = os.environ.get("GLIBC_TUNABLES")
            import jax
            import moejax
            from moejax import cli, evaluation, plotting, training
            from moejax.training import loop
            jax.devices()  # XLA's threads start here
            assert mallopt_lookups == [], mallopt_lookups
            assert os.environ.get("GLIBC_TUNABLES") == tunables
            """
        )
        + FAULTS_PER_BLOCK
        + HEAP_END
        + textwrap.dedent(
            """
            # The spy sees a call when there is one.
            from moejax.training import allocator
            assert allocator.tune_malloc().applied and mallopt_lookups == [True]
            """
        )
    )
    faults = float(lines[0].split()[-1])
    grown, _, _ = map(int, lines[1].split())
    # glibc's defaults: a fresh mapping per block on a thread, a fault per page ...
    assert faults > 0.9 * PAGES, faults
    # ... and 600 MiB blocks are mapped, not taken from the heap.
    assert grown < 1 << 20, grown


@on_glibc
@pytest.mark.parametrize("program", ["train.py", "eval.py"])
def test_the_programs_start_with_the_tuned_allocator(program):
    # Runs the program as `python PROGRAM --help` does; the settings must precede the start of
    # JAX's backend (moejax/training/allocator.py says why).
    run = MALLOPT_SPY + textwrap.dedent(
        f"""
        import runpy
        sys.argv = [{program!r}, "--help"]
        try:
            runpy.run_path({str(ROOT / program)!r}, run_name="__main__")
        except SystemExit as exit:
            assert exit.code in (0, None), exit.code
        assert mallopt_lookups == [False], "settings not applied, or after JAX's backend started"
        """
    )
    assert _faults_per_block(run) < 0.01 * PAGES
    # MOEJAX_MALLOC_TUNING=0 keeps the defaults.
    assert _faults_per_block(run.replace("[False]", "[]"), {allocator.OPT_OUT_VARIABLE: "0"}) > (
        0.9 * PAGES
    )
