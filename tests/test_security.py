"""Guest isolation (issue 19) against real QEMU and the real tiny guest.

Everything runs in a network namespace the test creates: its loopback stands
for the host's, and a portless bridge with 192.0.2.1 (TEST-NET-1) for "the
outside", so no packet leaves this machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from conftest import VM
from fixtures import ENV, wait_for

pytestmark = pytest.mark.slow

OUTSIDE = "192.0.2.1"
BOOT_TIMEOUT = 120.0
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)  # os.setns is Python 3.12+


@dataclass
class Listener:
    """A TCP listener that greets each connection with ``banner`` and counts them."""

    sock: socket.socket
    banner: str
    accepted: int = 0
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def _serve(self) -> None:
        with contextlib.suppress(OSError):  # closed at teardown
            while True:
                conn, _ = self.sock.accept()
                self.accepted += 1
                with conn:
                    conn.sendall(self.banner.encode() + b"\n")


class Netns:
    """A network namespace held open by a sleeping process: lo up, 192.0.2.1 on a portless
    bridge (this kernel has no dummy module)."""

    def __init__(self) -> None:
        setup = (
            "ip link set lo up && ip link add t0 type bridge && "
            f"ip addr add {OUTSIDE}/24 dev t0 && ip link set t0 up && echo up && exec sleep 3600"
        )
        self.holder = subprocess.Popen(
            ["unshare", "--net", "--", "sh", "-c", setup], stdout=subprocess.PIPE, text=True
        )
        assert self.holder.stdout is not None and self.holder.stdout.readline() == "up\n"
        self.fd = os.open(f"/proc/{self.holder.pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self.listeners: list[Listener] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def enter(self) -> None:
        """In the calling thread (or a child before exec): this namespace's network from now on."""
        if _libc.setns(self.fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")

    def listen(self, host: str, banner: str) -> Listener:
        made: list[socket.socket] = []

        def bind() -> None:  # a thread of its own: setns changes only the calling thread
            self.enter()
            sock = socket.create_server((host, 0))
            made.append(sock)

        thread = threading.Thread(target=bind)
        thread.start()
        thread.join()
        self.listeners.append(Listener(made[0], banner))
        return self.listeners[-1]

    def connect(self, host: str, port: int) -> bytes:
        """The first line a server here sends."""
        got: list[bytes] = []

        def run() -> None:
            self.enter()
            with socket.create_connection((host, port), timeout=10) as s:
                got.append(s.makefile("rb").readline())

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        return got[0] if got else b""

    def serve(self, vm: VM) -> subprocess.Popen[bytes]:
        """``vmhost serve`` for ``vm``, inside this namespace."""
        log = (vm.dir / "vmhost.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "vmhost", "serve", "t", *vm.args()],
            env=ENV,
            stdout=log,
            stderr=log,
            preexec_fn=self.enter,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        for listener in self.listeners:
            listener.sock.close()
        os.close(self.fd)
        self.holder.kill()
        self.holder.wait()


@pytest.fixture
def netns() -> Iterator[Netns]:
    if os.geteuid() != 0:
        pytest.skip("creating a network namespace needs root")
    ns = Netns()
    yield ns
    ns.close()


def probes(vm: VM, count: int, proc: subprocess.Popen[bytes]) -> dict[str, str]:
    """What the guest reported for each ``guest.probe`` target, once it reported them all."""
    pattern = re.compile(r"TINYGUEST PROBE (\S+) (.*)")

    def found() -> dict[str, str] | None:
        if proc.poll() is not None:
            raise AssertionError((vm.dir / "vmhost.log").read_text())
        text = vm.console.read_text(errors="replace") if vm.console.exists() else ""
        seen = {m[1]: m[2].strip() for m in pattern.finditer(text)}
        return seen if len(seen) >= count else None

    return wait_for(found, BOOT_TIMEOUT, f"{count} probe results on {vm.console}")


def test_guest_cannot_reach_the_host_loopback_nor_another_vm(
    netns: Netns, make_vm: Callable[..., VM]
) -> None:
    """Two guests: neither reaches 127.0.0.1 through the gateway (nor any other alias of the
    virtual network), so not the other's ssh forward either; outbound and its own forward work."""
    local = netns.listen("127.0.0.1", "LOOPBACK")
    outside = netns.listen(OUTSIDE, "OUTSIDE")
    other = make_vm()
    other_proc = netns.serve(other)
    targets = [
        f"10.0.2.2:{local.port}",
        f"10.0.2.77:{local.port}",
        f"10.0.2.2:{other.ssh_port}",
        f"{OUTSIDE}:{outside.port}",
    ]
    vm = make_vm(cmdline="guest.probe=" + ",".join(targets))
    wait_for(lambda: other.console.exists() and b"READY" in other.console.read_bytes(),
             BOOT_TIMEOUT, "the other guest to boot")  # fmt: skip
    proc = netns.serve(vm)
    seen = probes(vm, len(targets), proc)
    assert seen == {
        targets[0]: "FAILED",
        targets[1]: "FAILED",
        targets[2]: "FAILED",
        targets[3]: "OUTSIDE",
    }, seen
    assert local.accepted == 0
    # The forwards themselves still work from the host side.
    assert netns.connect("127.0.0.1", vm.ssh_port).startswith(b"SSH-2.0-tinyguest")
    assert netns.connect("127.0.0.1", other.ssh_port).startswith(b"SSH-2.0-tinyguest")
    assert other_proc.poll() is None and proc.poll() is None


def test_host_loopback_true_opens_it_again(netns: Netns, make_vm: Callable[..., VM]) -> None:
    """``[network] host_loopback = true``: the old behaviour, so the test above can fail."""
    local = netns.listen("127.0.0.1", "LOOPBACK")
    vm = make_vm()
    targets = [f"10.0.2.2:{local.port}", f"10.0.2.2:{vm.ssh_port}"]
    text = vm.config.read_text()
    text = text.replace("guest.token=", f"guest.probe={','.join(targets)} guest.token=")
    text = text.replace("[network]\n", "[network]\nhost_loopback = true\n")
    vm.config.write_text(text)
    proc = netns.serve(vm)
    seen = probes(vm, len(targets), proc)
    # Its own ssh forward stands for any VM's: through 127.0.0.1 they are all the same.
    assert seen == {targets[0]: "LOOPBACK", targets[1]: "SSH-2.0-tinyguest"}, seen
    assert local.accepted == 1
