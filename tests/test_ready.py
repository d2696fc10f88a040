"""``[boot] ready`` with the real tiny guest under a real ``vmhost serve``: every mode, the
timeout, a stop during the wait, a reboot, a reload; what systemd is told, read from a
NOTIFY_SOCKET the test binds as systemd would."""

from __future__ import annotations

import contextlib
import itertools
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import VM
from fixtures import ENV, Vmhost, vmhost_factory, wait_for

from vmhost.client import Client
from vmhost.control.wire import Response
from vmhost.service import EXIT_NOT_READY, EXIT_OK

pytestmark = pytest.mark.slow

MakeVM = Callable[..., VM]
VmhostFor = Callable[[VM], Vmhost]
BOOT: float = 90.0
"""TCG boots in ~3 s alone; other QEMUs on the two shared cores stretch it several times."""


class Systemd:
    """The notify socket systemd would hold: every message vmhost sends, with its arrival."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            while data := self._sock.recv(65536):
                fields = dict(line.split("=", 1) for line in data.decode().splitlines())
                self.messages.append((time.monotonic(), fields))

    def sent(self, key: str) -> list[tuple[float, str]]:
        return [(at, fields[key]) for at, fields in self.messages if key in fields]

    def close(self) -> None:
        self._sock.close()


@pytest.fixture
def vmhost_for(tmp_path: Path) -> Iterator[Callable[..., tuple[Vmhost, Systemd]]]:
    """A Vmhost whose NOTIFY_SOCKET is a Systemd of the test's."""
    made = vmhost_factory()
    make = next(made)
    systemds: list[Systemd] = []

    def vmhost_for(vm: VM) -> tuple[Vmhost, Systemd]:
        systemd = Systemd(tmp_path / f"notify{len(systemds)}")
        systemds.append(systemd)
        vmhost = make(vm)
        vmhost.env = {**ENV, "NOTIFY_SOCKET": str(systemd.path)}
        return vmhost, systemd

    yield vmhost_for
    with contextlib.suppress(StopIteration):
        next(made)
    for systemd in systemds:
        systemd.close()


def passed_on(systemd: Systemd, guest_status: str) -> bool:
    return any(
        text.endswith(f"; guest: tinyguest: {guest_status}") for _, text in systemd.sent("STATUS")
    )


def ready_vm(make_vm: MakeVM, mode: str, *, timeout: int = 120, **kw: str) -> VM:
    boot = f'ready = "{mode}"\nready_timeout_seconds = {timeout}'
    return make_vm(boot=boot, **kw)


def watch(vm: Vmhost) -> Iterator[Response]:
    """The watch from the first moment vmhost answers."""
    client = Client(vm.socket, detail=True)

    def connected() -> Iterator[Response] | None:
        try:
            changes = client.watch()
            return changes if next(changes) else None
        except Exception:
            return None

    return wait_for(connected, BOOT, "a watch")


def until(changes: Iterator[Response], event: str, timeout: float = BOOT) -> list[Response]:
    """The changes up to and including the first with ``event``."""
    seen = []
    deadline = time.monotonic() + timeout
    for change in changes:
        seen.append(change)
        if change.event == event:
            return seen
        assert time.monotonic() < deadline, f"no {event} in time: {seen}"
    raise AssertionError(f"the watch ended before {event}: {seen}")


@pytest.mark.parametrize(
    ("mode", "toml", "how"),
    [
        ("notify", "", "READY=1 on org.vmhost.notify.0"),
        ("ssh", "", "SSH banner on 127.0.0.1:"),
        ("agent", "[agent]\nport = 2223\n", "guest agent provisioned"),
    ],
)
def test_ready_when_the_guest_says_so(
    make_vm: MakeVM,
    vmhost_for: Callable[..., tuple[Vmhost, Systemd]],
    mode: str,
    toml: str,
    how: str,
) -> None:
    """booting (wire: running) until the mode's signal; then guest-ready and one READY=1."""
    vm, systemd = vmhost_for(ready_vm(make_vm, mode, toml=toml))
    vm.start()
    seen = until(watch(vm), "guest-ready")
    booting = [c for c in seen if c.vm_state == "booting"]
    assert booting and booting[0].state == "running", seen
    assert booting[0].message.startswith("QEMU runs; waiting for "), booting
    ready = seen[-1]
    assert (ready.state, ready.vm_state) == ("running", "running")
    assert re.fullmatch(
        rf"guest ready \d+\.\d\d s after QEMU started \({re.escape(how)}.*\)", ready.message
    ), ready
    assert {c.vm_state for c in seen[:-1]} <= {"starting", "booting"}
    took = float(ready.message.split()[2])
    status = vm.status()
    assert status.message == f"guest ready {took:.2f} s after QEMU started"

    wait_for(lambda: systemd.sent("READY"), 5, "READY=1")
    ((ready_at, _),) = systemd.sent("READY")
    before = [text for at, text in systemd.sent("STATUS") if at < ready_at]
    phases = [word for word, _ in itertools.groupby(text.split()[0] for text in before)]
    assert phases in (["booting:"], ["booting:", "running"]), before
    assert before[0].startswith("booting: waiting for "), before
    assert systemd.sent("EXTEND_TIMEOUT_USEC"), "the start timeout was not extended"
    if mode == "notify":  # the guest's STATUS= is passed on
        assert any("; guest: tinyguest: " in text for text in before), before

    Client(vm.socket).stop(20)
    assert vm.wait(30) == EXIT_OK
    assert len(systemd.sent("READY")) == 1
    assert vm.vm.clean()


def test_never_ready_is_stopped_and_fails(
    make_vm: MakeVM, vmhost_for: Callable[..., tuple[Vmhost, Systemd]]
) -> None:
    """Not ready in ready_timeout_seconds: the graceful chain, exit 8, no READY=1, a clean disk."""
    vm, systemd = vmhost_for(ready_vm(make_vm, "notify", timeout=25, cmdline="guest.never_ready=1"))
    started = time.monotonic()
    vm.start()
    changes = watch(vm)
    vm.wait_console("TINYGUEST READY")  # up, but it never says so on the port
    status = vm.status()
    assert (status.state, status.vm_state) == ("running", "booting"), status
    assert status.message.startswith("waiting for READY=1 on org.vmhost.notify.0 since "), status
    wait_for(lambda: passed_on(systemd, "up, but never ready"), 10, "the guest's STATUS=")
    rest = list(changes)
    assert vm.wait(60) == EXIT_NOT_READY, vm.output()
    elapsed = time.monotonic() - started
    assert 25 <= elapsed < 25 + 10 + 10, elapsed
    events = [c.event for c in rest]
    assert "acpi-power-down" in events and "guest-ready" not in events, rest
    assert (rest[-1].state, rest[-1].vm_state) == ("error", "error"), rest[-1]
    assert "not ready within ready_timeout_seconds (25 s)" in rest[-1].message
    assert systemd.sent("READY") == []
    assert "QEMU shutdown: guest-shutdown" in vm.output()
    assert vm.vm.marker() == vm.vm.token
    assert vm.vm.clean()


def test_stop_during_the_wait_is_honoured_at_once(
    make_vm: MakeVM, vmhost_for: Callable[..., tuple[Vmhost, Systemd]]
) -> None:
    """A stop while booting runs the chain now (not after the wait) and ends in exit 0."""
    vm, systemd = vmhost_for(
        ready_vm(make_vm, "notify", timeout=300, cmdline="guest.never_ready=1")
    )
    vm.start()
    changes = watch(vm)
    vm.wait_console("TINYGUEST READY")
    assert vm.status().vm_state == "booting"
    asked = time.monotonic()
    Client(vm.socket).stop(20)
    assert vm.wait(30) == EXIT_OK, vm.output()
    assert time.monotonic() - asked < 10
    rest = list(changes)
    assert rest[-1].vm_state == "stopped" and "guest-ready" not in {c.event for c in rest}
    # systemd would fail a Type=notify service leaving before READY=1 ("protocol") and restart it
    ((ready_at, _),) = systemd.sent("READY")
    assert ready_at > max(at for at, _ in systemd.sent("STOPPING"))
    assert vm.vm.clean()


def test_a_reboot_boots_again_without_a_second_ready(
    make_vm: MakeVM, vmhost_for: Callable[..., tuple[Vmhost, Systemd]]
) -> None:
    """A reset goes back to booting until the guest's next READY=1; systemd hears one READY=1."""
    vm, systemd = vmhost_for(ready_vm(make_vm, "notify", cmdline="guest.reboot_ready=1"))
    vm.start()
    changes = watch(vm)
    first = until(changes, "guest-ready")[-1]
    again = until(changes, "guest-ready")
    assert [c.vm_state for c in again][:1] == ["booting"] and again[0].event == "RESET", again
    assert "after its reset (READY=1 on org.vmhost.notify.0)" in again[-1].message
    assert "after QEMU started" in first.message
    assert vm.status().vm_state == "running"
    Client(vm.socket).stop(20)
    assert vm.wait(30) == EXIT_OK
    assert len(systemd.sent("READY")) == 1
    assert vm.vm.clean()


def test_the_notify_port_survives_a_reload(
    make_vm: MakeVM, vmhost_for: Callable[..., tuple[Vmhost, Systemd]]
) -> None:
    """Reloaded while running, vmhost still hears the guest's READY=1 after the next reboot;
    a force stop then ends it."""
    vm, _ = vmhost_for(ready_vm(make_vm, "notify", cmdline="guest.reboot_ready=8"))
    vm.start()
    until(watch(vm), "guest-ready")
    pid = vm.status().pid
    vm.signal(signal.SIGHUP)
    wait_for(lambda: "vmhost reloaded" in vm.output(), 20, "the reload")
    assert vm.status().message.startswith("guest ready ")  # the note is handed over
    again = until(watch(vm), "guest-ready", timeout=BOOT)
    assert "after its reset" in again[-1].message
    assert vm.status().pid == pid
    Client(vm.socket).force_stop()  # no stop chain: the status line must not need one
    assert vm.wait(30) == EXIT_OK
    assert "stopped: stop requested" in vm.output(), vm.output()[-3000:]
    assert "AssertionError" not in vm.output()
