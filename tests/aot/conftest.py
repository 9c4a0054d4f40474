"""Ahead-of-time compiles for TPU topologies on this CPU machine (libtpu, no TPU).

libtpu asks the cloud metadata server about the machine it runs on unless told not to, and
takes a machine-wide lock file that lets one process at a time own the TPU chips; these tests
compile for topology descriptions only, so neither is needed, and pytest-xdist workers (or
other programs compiling the same way) must not wait on each other.
"""

import os

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
