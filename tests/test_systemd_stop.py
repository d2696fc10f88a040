"""vmhost@NAME stopping under a real systemd: ACPI, a VM that stays down, every accepted
connection answered, vmhostctl stop and start, and stops longer than TimeoutStopSec."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from guest.build import GuestImage
from systemd_vm import STATUS, VM, ct, make_vm, venv, wait_for

from vmhost.journal import Event

__all__ = ["ct", "make_vm", "venv"]  # fixtures, used by name
pytestmark = pytest.mark.slow

# CLIENTS Go-style peers, each alternating status and stop until connects fail (the VM is
# down), each connect timed.  "skipped": unanswered, though made before an answered one was
# begun (the kernel queues in order: vmhost took it, or could have).  The unanswered rest came
# after vmhost's last accept, split by when vmhost (PID, watched through a pidfd) exited.
_HAMMER_STOP = """
import json, os, select, socket, sys, threading, time
path, clients, pidfd = sys.argv[1], int(sys.argv[2]), os.pidfd_open(int(sys.argv[3]))
exited, outcomes, refusals, lock = [], [], [], threading.Lock()
def watch():
    select.select([pidfd], [], [])
    exited.append(time.monotonic())
def client(i):
    refused, n = 0, i
    while refused < 3:
        n += 1
        request = b'{"method":"stop"}\\n' if n % 2 else b'{"method":"status"}\\n'
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            start = time.monotonic()
            try:
                s.connect(path)
            except (FileNotFoundError, ConnectionRefusedError):
                refused += 1
                with lock:
                    refusals.append(time.monotonic() - start)
                time.sleep(0.05)
                continue
            connected = time.monotonic()  # the connect is queued by now
            try:
                s.sendall(request)
                line = s.makefile("rb").readline()
            except OSError:
                line = b""
        with lock:
            outcomes.append((start, connected, line.endswith(b"\\n")))
threads = [threading.Thread(target=watch)]
threads += [threading.Thread(target=client, args=(i,)) for i in range(clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
last_answered = max(start for start, _, answered in outcomes if answered)
lost = [at - exited[0] for _, at, answered in outcomes if not answered]  # < 0: vmhost lived
print(json.dumps({
    "accepted": len(outcomes),
    "answered": len(outcomes) - len(lost),
    "skipped": sum(at < last_answered for _, at, answered in outcomes if not answered),
    "unanswered while vmhost lived": sum(after < 0 for after in lost),
    "reset after vmhost exited": sum(after >= 0 for after in lost),
    "refused": len(refusals),
    "slowest refusal ms": round(max(refusals) * 1000, 1),
    "lived ms": sorted(round(after * 1000, 1) for after in lost if after < 0),
    "reset ms": [round(f((a for a in lost if a >= 0), default=0) * 1000, 1) for f in (min, max)],
}))
"""


def test_stop_powers_the_guest_off_through_acpi(make_vm: Callable[..., VM]) -> None:
    """systemctl stop → ACPI power-off well within the timeout; clean exit; the disk survives."""
    vm = make_vm("acpi", timeout=20)
    vm.ct.systemctl("start", vm.unit)
    vm.wait_console()
    started = time.monotonic()
    vm.ct.systemctl("stop", vm.unit)
    elapsed = time.monotonic() - started

    assert elapsed < 10, f"stop took {elapsed:.1f} s: ACPI did not end the guest"
    assert vm.active() == "inactive"
    assert vm.ended_cleanly()
    shutdowns = [r["MESSAGE"] for r in vm.records("QMP_EVENT=SHUTDOWN")]
    assert any("guest-shutdown" in m for m in shutdowns), shutdowns
    ids = {r.get("MESSAGE_ID") for r in vm.records()}
    assert {Event.STOPPING.message_id, Event.STOPPED.message_id} <= ids
    assert vm.marker() == vm.token
    assert vm.clean()


def _stays_down(vm: VM) -> None:
    """Three status polls over three seconds, as a daemon's: none of them boots the VM again."""
    for _ in range(3):
        status = vm.ctl("status", vm.name, check=False)
        assert (status.returncode, status.stdout) == (3, f"{vm.name}: stopped\n"), status
        go = vm.ct.run("/usr/bin/python3", "/run/e2e/ask.py", vm.socket, STATUS, check=False)
        assert go.returncode != 0 and "FileNotFoundError" in go.stderr, go  # IsAlive() is false
        assert (vm.active(), vm.active(vm.socket_unit)) == ("inactive", "inactive")
        time.sleep(1)


@pytest.mark.parametrize("ending", ["control-stop", "systemctl-stop", "guest-poweroff"])
def test_a_stopped_vm_stays_down(make_vm: Callable[..., VM], ending: str) -> None:
    """The service ends, its socket with it: a client's status does not boot the VM again."""
    poweroff = ending == "guest-poweroff"
    vm = make_vm(f"down-{ending}", cmdline="guest.autopoweroff=1" if poweroff else "")
    vm.ct.systemctl("start", vm.unit)
    if not poweroff:
        vm.wait_console()  # so the stop is a quick ACPI one
    if ending == "control-stop":
        assert vm.ask('{"method":"stop"}') == '{"ok":true,"state":"stopping"}\n'
    elif ending == "systemctl-stop":
        vm.ct.systemctl("stop", vm.unit)
    wait_for("the service to end", lambda: vm.active() == "inactive")

    assert vm.ended_cleanly()
    if poweroff:
        shutdowns = [r["MESSAGE"] for r in vm.records("QMP_EVENT=SHUTDOWN")]
        assert any("guest-shutdown" in m for m in shutdowns), shutdowns
    _stays_down(vm)


def test_every_accepted_connection_is_answered_through_a_stop(make_vm: Callable[..., VM]) -> None:
    """Eight clients hammer status and stop through the stop they ask for: every connect made
    before vmhost's last accept gets an answer line, and once the VM is down connects fail at once.

    A connect made after it (in vmhost's last milliseconds, or after its exit, until systemd
    stops the socket) is reset unanswered: no vmhost is left to answer it.  Those are counted;
    while vmhost lives, each client can lose only the connect it made on vmhost's last answer."""
    vm = make_vm("hammered")
    vm.ct.systemctl("start", vm.unit)
    vm.wait_console()
    pid = vm.show("MainPID")["MainPID"]
    vm.ct.write("/run/e2e/hammer_stop.py", _HAMMER_STOP)
    hammer = ("/usr/bin/python3", "/run/e2e/hammer_stop.py", vm.socket, "8", pid)
    counts = json.loads(vm.ct.run(*hammer, timeout=120).stdout)
    print(f"\n8 clients hammering status and stop through a stop: {counts}")

    assert vm.active() == "inactive"
    assert counts["accepted"] > 8 and counts["refused"] == 8 * 3, counts
    assert counts["slowest refusal ms"] < 1000, counts
    assert counts["answered"] > 8 and counts["skipped"] == 0, counts
    assert counts["unanswered while vmhost lived"] <= 8, counts


def test_vmhostctl_stop_waits_until_gone_and_start_brings_it_back(
    make_vm: Callable[..., VM],
) -> None:
    """`vmhostctl stop NAME` shows the stop chain's steps and returns once the VM is gone;
    `vmhostctl start NAME` starts the service (and its socket) and returns once it runs."""
    vm = make_vm("ctl")
    vm.ct.systemctl("start", vm.unit)
    vm.wait_console()

    lines = vm.ctl("stop", vm.name).stdout.splitlines()
    assert (vm.active(), vm.active(vm.socket_unit)) == ("inactive", "inactive")
    assert any(x.startswith(f"{vm.name}: stopping (stop: ACPI power-down") for x in lines), lines
    assert lines[-1].startswith(f"{vm.name}: stopped"), lines
    assert vm.ctl("stop", vm.name).stdout == f"{vm.name}: stopped\n"  # already down: nothing to do

    started = vm.ctl("start", vm.name).stdout
    assert started.startswith(f"{vm.name}: running\n"), started
    assert (vm.active(), vm.active(vm.socket_unit)) == ("active", "active")
    assert vm.ctl("is-alive", vm.name).returncode == 0

    vm.ct.write("/etc/vmhost/.keep", "")  # /etc/vmhost exists, no config of that name
    unknown = vm.ctl("status", "nosuchvm", check=False)
    assert (
        unknown.returncode == 4
        and "no VM nosuchvm here: no /etc/vmhost/nosuchvm.toml" in unknown.stderr
    ), unknown
    assert vm.ctl("is-alive", "nosuchvm", check=False).returncode == 1


def test_long_stop_extends_systemd_timeout(
    make_vm: Callable[..., VM], deaf_guest: GuestImage
) -> None:
    """A stop longer than TimeoutStopSec asks for more (EXTEND_TIMEOUT_USEC) and is not killed."""
    vm = make_vm("deaf", image=deaf_guest, timeout=6, service="TimeoutStopSec=3")
    vm.ct.systemctl("start", vm.unit)
    vm.wait_console()
    started = time.monotonic()
    vm.ct.systemctl("stop", vm.unit)
    elapsed = time.monotonic() - started

    assert 5 < elapsed < 15, elapsed
    assert vm.ended_cleanly()  # exit 0: not killed at TimeoutStopSec


def test_control_stop_longer_than_timeout_stop_sec_is_not_killed(
    make_vm: Callable[..., VM], deaf_guest: GuestImage
) -> None:
    """A control-socket stop of 12 s, then systemctl stop, with TimeoutStopSec=3: systemd is
    told what the running chain needs (not the config's 1 s), so nothing is SIGKILLed."""
    vm = make_vm("longctl", image=deaf_guest, timeout=1, service="TimeoutStopSec=3")
    vm.ct.systemctl("start", vm.unit)
    vm.wait_console()
    stop = "import sys; from vmhost.client import Client; print(Client(sys.argv[1]).stop(12))"
    started = time.monotonic()
    assert "stopping" in vm.ct.run(str(vm.venv / "bin/python"), "-c", stop, vm.socket).stdout
    wait_for("ACPI pressed", lambda: "stop: ACPI power-down" in messages(vm))
    vm.ct.systemctl("stop", vm.unit)
    elapsed = time.monotonic() - started

    assert 11 < elapsed < 30, (
        elapsed,
        messages(vm),
        vm.ct.run("journalctl", "-u", vm.unit, "-o", "cat").stdout,
    )
    assert vm.ended_cleanly()  # exit 0: not SIGKILLed at TimeoutStopSec
    assert "stop: QMP quit" in messages(vm)  # the chain ran out its 12 s


def messages(vm: VM) -> str:
    return "\n".join(str(r["MESSAGE"]) for r in vm.records("SYSLOG_IDENTIFIER=vmhost"))
