"""Ahead-of-time compiles for TPU topologies on this CPU machine (libtpu, no TPU).

libtpu asks the cloud metadata server about the machine it runs on unless told not to, and
takes a machine-wide lock file that lets one process at a time own the TPU chips; these tests
compile for topology descriptions only, so neither is needed, and pytest-xdist workers (or
other programs compiling the same way) must not wait on each other.

JAX's persistent compilation cache (tests/conftest.py turns it on) stores these executables but
cannot read them back without a TPU client: it warns and compiles again, so the test modules
ignore that warning.
"""

import os
import pathlib

import pytest

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


_HERE = pathlib.Path(__file__).parent


def pytest_collection_modifyitems(items):
    ignore = pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache entry")
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(ignore)
