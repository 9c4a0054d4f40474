"""Ahead-of-time compiles for TPU topologies on this CPU machine (libtpu, no TPU).

libtpu asks the cloud metadata server about the machine it runs on unless told not to, and
takes a machine-wide lock file that lets one process at a time own the TPU chips; these tests
compile for topology descriptions only, so neither is needed, and pytest-xdist workers (or
other programs compiling the same way) must not wait on each other.
"""

import os

import jax
import pytest

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


@pytest.fixture(autouse=True)
def no_persistent_compilation_cache():
    """An executable compiled for a topology without a TPU client cannot be read back from
    JAX's persistent cache (tests/conftest.py turns it on): each read would warn and recompile."""
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    yield
    jax.config.update("jax_enable_compilation_cache", enabled)
