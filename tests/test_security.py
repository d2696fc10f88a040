"""Guest isolation (issue 19) against real QEMU and the real tiny guest.

Everything runs in a network namespace the test creates: its loopback stands
for the host's, and a portless bridge with 192.0.2.1 (TEST-NET-1) for "the
outside", so no packet leaves this machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import VM, prerequisite_missing
from fixtures import ENV, Vmhost, wait_for
from guest.build import GuestImage

from vmhost.client import Client
from vmhost.vm import console as console_journal

OUTSIDE = "192.0.2.1"
KEY = "ssh-ed25519 AAAAC3NzaTEST vmhost@test"
NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--")
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
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            # Below the ephemeral range, where free_port() (the VMs' forwards, picked in the
            # host's namespace) never lands: a listener here cannot take a VM's port.
            low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
            for port in random.sample(range(10000, low), 50):
                try:
                    made.append(socket.create_server((host, port), family=family))
                    return
                except OSError as e:
                    if e.errno != errno.EADDRINUSE:
                        raise

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
        prerequisite_missing("creating a network namespace needs root")
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


@pytest.mark.slow
def test_guest_cannot_reach_the_host_loopback_nor_another_vm(
    netns: Netns, make_vm: Callable[..., VM]
) -> None:
    """Two guests: neither reaches 127.0.0.1 through the gateway (nor any other alias of the
    virtual network), so not the other's ssh forward either; outbound and its own forward work."""
    local = netns.listen("127.0.0.1", "LOOPBACK")
    local6 = netns.listen("::1", "LOOPBACK6")
    outside = netns.listen(OUTSIDE, "OUTSIDE")
    other = make_vm()
    other_proc = netns.serve(other)
    targets = [
        f"10.0.2.2:{local.port}",
        f"10.0.2.77:{local.port}",
        f"10.0.2.2:{other.ssh_port}",
        f"fec0::2:{local6.port}",  # QEMU's IPv6 gateway -> the host's ::1
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
        targets[3]: "FAILED",
        targets[4]: "OUTSIDE",
    }, seen
    assert local.accepted == local6.accepted == 0
    # The forwards themselves still work from the host side.
    assert netns.connect("127.0.0.1", vm.ssh_port).startswith(b"SSH-2.0-tinyguest")
    assert netns.connect("127.0.0.1", other.ssh_port).startswith(b"SSH-2.0-tinyguest")
    assert other_proc.poll() is None and proc.poll() is None


@pytest.mark.slow
def test_host_loopback_true_opens_it_again(netns: Netns, make_vm: Callable[..., VM]) -> None:
    """``[network] host_loopback = true``: the old behaviour, so the test above can fail."""
    local = netns.listen("127.0.0.1", "LOOPBACK")
    local6 = netns.listen("::1", "LOOPBACK6")
    vm = make_vm()
    targets = [f"10.0.2.2:{local.port}", f"10.0.2.2:{vm.ssh_port}", f"fec0::2:{local6.port}"]
    text = vm.config.read_text()
    text = text.replace("guest.token=", f"guest.probe={','.join(targets)} guest.token=")
    text = text.replace("[network]\n", "[network]\nhost_loopback = true\n")
    vm.config.write_text(text)
    proc = netns.serve(vm)
    seen = probes(vm, len(targets), proc)
    # Its own ssh forward stands for any VM's: through 127.0.0.1 they are all the same.
    assert seen == {
        targets[0]: "LOOPBACK",
        targets[1]: "SSH-2.0-tinyguest",
        targets[2]: "LOOPBACK6",
    }, seen
    assert local.accepted == local6.accepted == 1


def tcp_listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (its sockets' inodes in its netns' tables)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for row in list(f)[1:]:
                cols = row.split()
                if cols[3] == "0A" and cols[9] in inodes:
                    ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.mark.slow
def test_agent_answers_vmhost_alone(
    make_vm: Callable[..., VM],
    deaf_guest: GuestImage,
    vmhost_for: Callable[[VM], Vmhost],
) -> None:
    """The agent is behind a unix socket QEMU makes in the state dir: another user cannot open
    it, no TCP port leads to it (so no guest can reach it either), and vmhost provisions and
    stops through it: a guest deaf to ACPI powers off within the agent's share of the stop."""
    agent_port = 40000 + os.getpid() % 20000  # the old forward's port: now it must stay closed
    agent = f'[agent]\nport = {agent_port}\nssh_public_key = "{KEY}"\n'
    vm = make_vm(image=deaf_guest, toml=agent, timeout=20)
    for directory in (vm.dir, *vm.dir.parents):  # only the socket's own mode stands in the way
        directory.chmod(directory.stat().st_mode | 0o005)
    served = vmhost_for(vm)
    status = served.boot()
    wait_for(lambda: "provisioned" in served.output(), BOOT_TIMEOUT, "agent provisioning")
    assert f"agent.port {agent_port} is not used" in served.output()

    sock = vm.dir / "agent.sock"
    assert sock.is_socket() and sock.stat().st_mode & 0o022 == 0, oct(sock.stat().st_mode)
    assert tcp_listening_ports(status.pid) == {vm.ssh_port}

    # A second guest, even one allowed onto the host's loopback, finds the first one's ssh
    # forward there, and no agent.
    targets = [f"10.0.2.2:{vm.ssh_port}", f"10.0.2.2:{agent_port}"]
    intruder = make_vm(cmdline="guest.probe=" + ",".join(targets))
    text = intruder.config.read_text().replace("[network]\n", "[network]\nhost_loopback = true\n")
    intruder.config.write_text(text)
    probing = vmhost_for(intruder)
    proc = probing.start().proc
    assert proc is not None
    assert probes(intruder, len(targets), proc) == {
        targets[0]: "SSH-2.0-tinyguest",
        targets[1]: "FAILED",
    }
    other = subprocess.run(
        [*NOBODY, sys.executable, "-c", _CONNECT, str(sock), str(agent_port)],
        capture_output=True,
        text=True,
    )
    assert other.stdout.split() == ["unix:PermissionError", "tcp:ConnectionRefusedError"], other

    started = time.monotonic()
    assert Client(vm.socket).stop(20).state == "stopping"
    assert served.wait(30) == 0
    elapsed = time.monotonic() - started
    log = served.output()
    assert "stop: guest agent shutdown" in log and "ACPI power-down" not in log, log
    assert elapsed < 10, f"{elapsed:.1f} s: the agent did not stop the deaf guest"
    assert vm.marker("/agent/ssh/admin/authorized_keys") == KEY  # provisioned through it


# A would-be intruder: try the agent's unix socket and its old TCP forward.
_CONNECT = """
import socket, sys
for kind, family, address in (
    ("unix", socket.AF_UNIX, sys.argv[1]),
    ("tcp", socket.AF_INET, ("127.0.0.1", int(sys.argv[2]))),
):
    try:
        with socket.socket(family) as s:
            s.settimeout(5)
            s.connect(address)
            s.sendall(b'{"type":"ping"}\\n')
            print(f"{kind}:answered:{s.recv(100)!r}")
    except OSError as e:
        print(f"{kind}:{type(e).__name__}")
"""


def test_console_budget_sends_a_bounded_share_and_counts_the_rest(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Ten seconds' worth at once, then the rate; whatever is over is counted and reported
    by vmhost, at most once a second, and a partial line waits for its end."""
    sent: list[str] = []
    monkeypatch.setattr("vmhost.vm.console.journal.send", lambda message, **_: sent.append(message))
    now = [100.0]
    console = console_journal.ConsoleJournal("vm", 5, clock=lambda: now[0])
    console(b"".join(b"line %d\r\n" % i for i in range(80)) + b"part")
    assert sent == [f"line {i}" for i in range(50)]  # the burst: 10 s at 5 lines/s
    now[0] += 0.5
    console(b"ial\n" + b"more\n" * 9)
    assert sent[50:] == ["partial", "more"]  # 2.5 lines' worth of budget came back
    now[0] += 0.2
    console(b"x\n" * 100)
    assert sent[52:] == ["x"]
    assert caplog.messages == []  # 137 dropped so far, but a report waits a second
    now[0] += 1.0
    console(b"late\n")
    assert sent[53:] == ["late"]
    assert caplog.messages == [
        "137 guest console lines not sent to the journal (over its budget of 5 lines/s); "
        "console.log has them"
    ]
    assert caplog.records[0].__dict__["VMHOST_CONSOLE_DROPPED"] == "137"


@pytest.mark.slow
def test_console_log_rotates_within_its_cap(
    make_vm: Callable[..., VM], vmhost_for: Callable[[VM], Vmhost]
) -> None:
    """A guest printing at full speed: console.log rotates at file_kib and keeps ``files``."""
    vm = make_vm(cmdline="guest.flood=4", toml="[console]\nfile_kib = 64\nfiles = 3\n")
    served = vmhost_for(vm)
    served.start()
    served.wait_console("TINYGUEST FLOOD DONE", BOOT_TIMEOUT)
    files = sorted(p.name for p in vm.dir.glob("console.log*"))
    assert files == ["console.log", "console.log.1", "console.log.2"], files
    sizes = {name: (vm.dir / name).stat().st_size for name in files}
    assert all(size <= 64 * 1024 for size in sizes.values()), sizes
    assert b"TINYGUEST FLOOD the guest" in (vm.dir / "console.log.2").read_bytes()
