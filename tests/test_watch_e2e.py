"""`watch` against a real `vmhost serve` and the real tiny guest: what a watcher sees of a stop,
a hang and a reload, and what a Go client does not see of watchers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

import msgspec
import pytest
from conftest import VM
from fixtures import ENV, Vmhost, wait_for
from guest.build import GuestImage
from serving import WATCH

from vmhost.client import Client
from vmhost.control.wire import Response
from vmhost.errors import ClientError
from vmhost.vm import controller

MARGIN: Final = 3.0
"""Scheduling slack on a shared 2-core machine running other QEMUs."""
CTL: Final = "import sys; from vmhost.cli import vmhostctl_main; sys.exit(vmhostctl_main())"


def events(vm: Vmhost, *options: str) -> subprocess.Popen[str]:
    """``vmhostctl events`` on ``vm``'s socket, its lines readable as they come."""
    return subprocess.Popen(
        [sys.executable, "-c", CTL, "events", "--socket", str(vm.socket), *options],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class Watching:
    """``Client.watch()`` in a thread: what it has seen so far, and whether it ended."""

    def __init__(self, vm: Vmhost) -> None:
        self.seen: list[Response] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(Client(vm.socket),), daemon=True)
        self._thread.start()

    def _run(self, client: Client) -> None:
        try:
            for response in client.watch():
                self.seen.append(response)
        except BaseException as e:
            self.error = e

    def states(self) -> list[str]:
        return [r.vm_state for r in self.seen]

    def until(self, state: str, timeout: float) -> list[str]:
        wait_for(lambda: state in self.states()[1:] or self.error, timeout, f"a change to {state}")
        assert self.error is None, self.error
        return self.states()

    def ended(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


@pytest.mark.slow
def test_stop_seen_by_a_watcher_in_order(
    make_vm: Callable[..., VM], vmhost_for: Callable[[VM], Vmhost]
) -> None:
    """`vmhostctl events --json`: running, then stopping with the chain's step as an event,
    then stopped, then the end (exit 0), in that order; the human form says the same."""
    vm = vmhost_for(make_vm())
    vm.boot()
    human, machine = events(vm), events(vm, "--json")
    assert machine.stdout is not None and human.stdout is not None
    first = msgspec.json.decode(machine.stdout.readline())
    assert (first["vm_state"], first["pid"]) == ("running", vm.status().pid)
    assert " running" in human.stdout.readline()
    Client(vm.socket).stop(10)
    out, err = machine.communicate(timeout=30)
    assert machine.returncode == 0, err
    lines = [msgspec.json.decode(line) for line in out.splitlines()]
    assert [(r["vm_state"], r.get("event", "")) for r in lines] == [
        ("stopping", ""),
        ("stopping", "acpi-power-down"),
        ("stopped", ""),
    ]
    assert lines[0]["message"] == "stop requested, 10 s to finish"
    assert lines[1]["message"].startswith("stop: ACPI power-down (")
    assert lines[2]["message"] == "stop requested"
    assert vm.wait(30) == 0
    human_out = human.communicate(timeout=30)[0].splitlines()
    assert human.returncode == 0
    assert [line.split(" ", 2)[1] for line in human_out] == ["stopping", "stopping", "stopped"]
    assert "[acpi-power-down] stop: ACPI power-down (" in human_out[1]


@pytest.mark.slow
def test_deaf_guest_stop_steps_and_hang_seen(
    make_vm: Callable[..., VM], deaf_guest: GuestImage, vmhost_for: Callable[[VM], Vmhost]
) -> None:
    """QEMU SIGSTOPped: the watcher sees unresponsive, then running after SIGCONT; then a
    guest deaf to ACPI: every step of the chain it takes, in order, then stopped and EOF."""
    vm = vmhost_for(make_vm(image=deaf_guest))
    qemu_pid = vm.boot().pid
    watching = Watching(vm)
    wait_for(lambda: watching.seen, 10, "the snapshot")
    assert watching.states() == ["running"]
    limit = controller.PROBE_INTERVAL + controller.PROBE_TIMEOUT + MARGIN
    os.kill(qemu_pid, signal.SIGSTOP)
    try:
        assert watching.until("unresponsive", limit) == ["running", "unresponsive"]
    finally:
        os.kill(qemu_pid, signal.SIGCONT)
    assert watching.until("running", limit) == ["running", "unresponsive", "running"]
    assert watching.seen[1].message == f"QMP did not answer in {controller.PROBE_TIMEOUT:g} s"
    assert watching.seen[2].message == "QMP answers again"

    Client(vm.socket).stop(2)
    assert watching.ended(30)
    assert watching.error is None, watching.error
    tail = [(r.vm_state, r.event) for r in watching.seen[3:]]
    assert tail == [
        ("stopping", ""),
        ("stopping", "acpi-power-down"),
        ("stopping", "qmp-quit"),
        ("stopped", ""),
    ]
    assert vm.wait(30) == 0


GO_REQUESTS: Final = {
    b'{"method":"status"}\n': b'{"ok":true,"state":"running"}\n',
    b'{"method":"info"}\n': b'{"ok":true,"state":"running","ssh_port":%d,"backend":"qemu"}\n',
    b'{"method":"reboot"}\n': b'{"ok":false,"error":"unknown method: reboot"}\n',
}


def go_call(path: Path, request: bytes) -> bytes:
    """What the Go client does: dial, write one line, read one value, close."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(request)
        with sock.makefile("rb") as reader:
            return reader.readline()


@pytest.mark.slow
def test_go_client_sees_nothing_new_with_watchers(
    make_vm: Callable[..., VM], vmhost_for: Callable[[VM], Vmhost]
) -> None:
    """With 100 watchers and one that never reads, a one-request-per-connection client gets
    the same bytes as without them, the Go server's; every watcher then sees the stop."""
    made = make_vm()
    vm = vmhost_for(made)
    vm.boot()
    expected = {k: v.replace(b"%d", str(made.ssh_port).encode()) for k, v in GO_REQUESTS.items()}
    alone = {request: go_call(vm.socket, request) for request in expected}
    assert alone == expected
    watchers = []
    for _ in range(100):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(vm.socket))
        sock.sendall(WATCH)
        watchers.append(sock.makefile("rb"))
        sock.close()  # the file keeps it open
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deaf.connect(str(vm.socket))
    deaf.sendall(WATCH)
    for reader in watchers:
        assert b'"vm_state":"running"' in reader.readline()
    for _ in range(20):
        assert {request: go_call(vm.socket, request) for request in expected} == expected
    assert go_call(vm.socket, b'{"method":"stop","timeout_seconds":10}\n') == (
        b'{"ok":true,"state":"stopping"}\n'
    )
    assert go_call(vm.socket, b'{"method":"status"}\n') == b'{"ok":true,"state":"stopping"}\n'
    for reader in watchers:
        ends = [msgspec.json.decode(line)["vm_state"] for line in reader.readlines()]
        assert ends[-1] == "stopped" and set(ends[:-1]) == {"stopping"}
        reader.close()
    deaf.close()
    assert vm.wait(30) == 0


@pytest.mark.slow
def test_reload_ends_a_watch_and_the_next_one_sees_the_vm(
    make_vm: Callable[..., VM], vmhost_for: Callable[[VM], Vmhost]
) -> None:
    """SIGHUP (reload): the watch gets `vmhost reloaded` and ends, cut short; a new watch
    on the reloaded vmhost starts from the adopted state (running), not `starting`."""
    vm = vmhost_for(make_vm())
    qemu_pid = vm.boot().pid
    before = Watching(vm)
    wait_for(lambda: before.seen, 10, "the snapshot")
    vm.signal(signal.SIGHUP)
    assert before.ended(30)
    assert [r.message for r in before.seen[1:]] == ["vmhost reloaded"]
    assert isinstance(before.error, ClientError) and "ended before the VM" in str(before.error)
    after = wait_for(lambda: _snapshot(vm), 30, "a watch on the reloaded vmhost")
    assert (after.vm_state, after.pid) == ("running", qemu_pid)
    assert after.message == "taken over by the reloaded vmhost"
    Client(vm.socket).stop(10)
    assert vm.wait(30) == 0


def _snapshot(vm: Vmhost) -> Response | None:
    try:
        return next(Client(vm.socket, deadline=2).watch())
    except ClientError:
        return None


@pytest.mark.slow
@pytest.mark.parametrize("asked", [["--timeout", "2"], []], ids=["timeout", "config"])
def test_vmhostctl_stop_prints_the_chain_as_it_goes(
    make_vm: Callable[..., VM],
    deaf_guest: GuestImage,
    vmhost_for: Callable[[VM], Vmhost],
    asked: list[str],
) -> None:
    """`vmhostctl stop` on a guest deaf to ACPI: each step on its own line, in order, and it
    returns once vmhost is gone; without --timeout the chain gets [stop] timeout_seconds."""
    vm = vmhost_for(make_vm(image=deaf_guest, timeout=2 if not asked else 10))
    vm.boot()
    label = str(vm.socket)
    out = subprocess.run(
        [sys.executable, "-c", CTL, "stop", "--socket", label, *asked],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert vm.wait(10) == 0
    lines = out.stdout.splitlines()
    assert lines[:2] == [
        f"{label}: stopping (stop timeout 2 s)",
        f"{label}: stopping (stop requested, 2 s to finish)",
    ]
    assert lines[2].startswith(f"{label}: stopping (stop: ACPI power-down (")
    assert lines[3].startswith(f"{label}: stopping (stop: QMP quit (")
    assert lines[4:] == [f"{label}: stopped (stop requested)"]
