"""Meshes over TPU topologies: every config mesh of a pod's device count can be laid out."""

import pytest

pytest.importorskip("libtpu", reason="TPU topology descriptions need libtpu ([tpu] extra)")

from moejax.parallel import aot, sharding  # noqa: E402


@pytest.mark.parametrize(
    "sizes",
    [
        {"data": 8, "fsdp": 1, "expert": 8, "tensor": 1},
        {"data": 4, "fsdp": 1, "expert": 16, "tensor": 1},
        {"data": 2, "fsdp": 4, "expert": 8, "tensor": 1},
    ],
)
def test_mesh_axes_that_split_torus_axes_are_laid_out(sizes):
    # 8 and 16 are no product of the v5p-64's torus axes (4, 4, 4): they split one.
    devices = aot.topology_devices("v5p:4x4x4")
    mesh = sharding.make_mesh(sizes, devices)
    assert dict(mesh.shape) == sizes
    assert sorted(device.id for device in mesh.devices.flat) == sorted(d.id for d in devices)
