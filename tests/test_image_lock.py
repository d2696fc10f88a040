"""QEMU's image locking: the last guard against one VM running on two hosts at once (issue 27).

A cluster that loses track of a VM (no fencing, a split brain) may start it a
second time on another node; on shared storage the second QEMU must be
refused, or the two guests corrupt the disk.  tests/test_cluster.py shows the
same across container nodes under Pacemaker.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import Callable

import msgspec
import pytest
from conftest import VM, bare_qemu

from vmhost import config as vmconfig
from vmhost.vm import argv as qemu


def test_argv_leaves_image_locking_on(make_vm: Callable[..., VM]) -> None:
    """vmhost never passes QEMU a ``locking=`` option (its default, on, is what protects)."""
    config = vmconfig.load(make_vm().config)
    argv = qemu.argv(config, name="lock", qmp_fd=3, console_fd=4, kvm=False)
    options = [o for a in argv for o in a.split(",")]
    assert [o for o in options if o.partition("=")[0].endswith("locking")] == []
    assert any(o.startswith("file=") and o.endswith("/disk.img") for o in options)


@pytest.mark.slow
async def test_second_qemu_on_the_same_disk_is_refused(make_vm: Callable[..., VM]) -> None:
    """A second QEMU on a disk in use exits at once on the write lock; the first runs on."""
    config = vmconfig.load(make_vm().config)
    async with bare_qemu(config, "first") as first:
        qmp_parent, qmp_child = socket.socketpair()
        console_read, console_write = os.pipe()
        # Another host has its own loopback: only the disk is shared, not the SSH forward.
        elsewhere = msgspec.structs.replace(
            config, network=msgspec.structs.replace(config.network, ssh_port=0)
        )
        args = qemu.argv(
            elsewhere, name="second", qmp_fd=qmp_child.fileno(), console_fd=console_write, kvm=False
        )
        second = await asyncio.create_subprocess_exec(
            *args, pass_fds=[qmp_child.fileno(), console_write], stderr=subprocess.PIPE
        )
        for fd in (qmp_child.fileno(), console_write, console_read):
            os.close(fd)
        qmp_child.detach()
        try:
            async with asyncio.timeout(30):
                _, stderr = await second.communicate()
        finally:
            if second.returncode is None:
                second.kill()
            qmp_parent.close()
        assert second.returncode == 1
        assert b'Failed to get "write" lock' in stderr, stderr
        assert first.proc.returncode is None
        assert (await first.qmp.execute("query-status"))["status"] == "running"  # type: ignore[index]
