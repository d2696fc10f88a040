"""vmhost@NAME under a real systemd (issue 5 §6), in a container booted for this module.

The units from units/ are installed as they ship, with one drop-in pointing
ExecStart at a venv holding a copy of this working tree's code.  Each test runs its own VM instance
(its own name), so no test reads another's journal records or unit state.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import container
import pytest
from container import Container
from guest.build import GuestImage
from systemd_vm import (
    READY_LINE,
    VM,
    hammered,
    install_vmhost,
    make_vm,
    venv,
    wait_for,
)

from vmhost.journal import Event

__all__ = ["make_vm", "venv"]  # fixtures, used by name
pytestmark = pytest.mark.slow

STATUS = '{"method":"status"}'

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

# vmhost.logs.entries as the CLI uses it: prints each line, stops after COUNT lines.
_READ_LOGS = """
import asyncio, sys
from vmhost.logs import entries
name, lines = sys.argv[1], int(sys.argv[2])
follow, count = sys.argv[3] == "follow", int(sys.argv[4])
async def main():
    seen = 0
    async for line in entries(name, lines=lines, follow=follow):
        print(line.split(": ", 1)[1], flush=True)
        seen += 1
        if seen == count:
            return
asyncio.run(main())
"""

# Run as vmhost@NAME.service: sends NAME's messages, then waits until journald has them with the
# unit attributed (journald reads the sender's cgroup, so a sender gone too soon would lose it).
_SEND_LOGS = """
import sys, time
from systemd import journal
name = sys.argv[1]
messages = open(f"/run/e2e/{name}.messages").read().splitlines()
for m in messages:
    journal.send(m, VMHOST_VM=name)
reader = journal.Reader()
reader.add_match(_SYSTEMD_UNIT=f"vmhost@{name}.service", VMHOST_VM=name)
deadline = time.monotonic() + 20
seen = set()
while not set(messages) <= seen and time.monotonic() < deadline:
    reader.wait(0.2)
    seen |= {entry["MESSAGE"] for entry in reader}
"""


@pytest.fixture(scope="module")
def ct(venv: Path, guest: GuestImage, deaf_guest: GuestImage) -> Iterator[Container]:
    binds = {venv, guest.kernel.parent, deaf_guest.kernel.parent}  # not the checkout: see venv()
    with container.boot("vmhost-e2e", ro_binds=sorted(map(str, binds))) as booted:
        install_vmhost(booted, venv)
        booted.write("/run/e2e/read_logs.py", _READ_LOGS)
        booted.write("/run/e2e/hammer_stop.py", _HAMMER_STOP)
        booted.write("/run/e2e/send_logs.py", _SEND_LOGS)
        yield booted


def watching(ct: Container, pid: str) -> bool:
    """Whether a journal reader has its inotify fd: every record from then on reaches it
    (vmhost.logs.entries takes it before reading the tail)."""
    family = f"{pid} $(cat /proc/{pid}/task/*/children)"  # it may run under timeout(1)
    find = f'for p in {family}; do find /proc/$p/fd -lname "anon_inode:inotify"; done'
    return bool(ct.run("sh", "-c", find, check=False).stdout.strip())


def test_start_reports_the_truth_to_systemd_and_the_journal(make_vm: Callable[..., VM]) -> None:
    """systemctl start → active; StatusText, MainPID, NRestarts, vmhostctl and the journal agree."""
    vm = make_vm("demo")
    started = time.monotonic()
    vm.ct.systemctl("start", vm.unit)
    elapsed = time.monotonic() - started

    props = vm.show("ActiveState", "SubState", "StatusText", "MainPID", "NRestarts", "WatchdogUSec")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running")
    assert props["StatusText"].startswith("running"), props
    assert props["NRestarts"] == "0"
    assert props["WatchdogUSec"] == "30s"
    cmdline = vm.ct.run("cat", f"/proc/{props['MainPID']}/cmdline").stdout.split("\0")
    assert cmdline[-3:-1] == ["serve", "demo"], cmdline
    assert vm.ctl("status", "demo").stdout.startswith("demo: running\n")

    vm.wait_console()
    records = vm.records()
    assert {r["SYSLOG_IDENTIFIER"] for r in records} == {"vmhost", "vmhost-console"}
    assert {r["_SYSTEMD_UNIT"] for r in records} == {vm.unit}
    ids = {r.get("MESSAGE_ID") for r in records}
    assert {Event.STARTED.message_id, Event.READY.message_id} <= ids
    assert any(r.get("VMHOST_STATE") == "running" for r in records)

    # WATCHDOG=1 keeps coming from the event loop.
    fed = vm.show("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
    wait_for("a watchdog ping", lambda: vm.show("WatchdogTimestampMonotonic") != {
        "WatchdogTimestampMonotonic": fed
    }, timeout=20)  # fmt: skip

    print(f"\nsystemctl start {vm.unit} -> active (running): {elapsed:.2f} s")
    print(vm.ct.systemctl("status", "--no-pager", "--lines=0", vm.unit).stdout)


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


def test_first_connect_starts_a_stopped_instance(make_vm: Callable[..., VM]) -> None:
    """With only the socket listening, a client's connect starts the VM and gets an answer."""
    vm = make_vm("activate")
    vm.ct.systemctl("start", f"vmhost@{vm.name}.socket")
    assert vm.show("ActiveState")["ActiveState"] == "inactive"
    mode = vm.ct.run("stat", "-c", "%A %U", vm.socket).stdout.split()
    assert mode == ["srw-rw----", "root"]

    # A client's connect (the Go client's), not `vmhostctl status NAME`: that one only looks.
    reply = json.loads(vm.ask(STATUS))
    assert reply == {"ok": True, "state": "running"}, reply  # starting is "running" on the wire
    wait_for("the service to be active", lambda: vm.show("ActiveState")["ActiveState"] == "active")

    vm.wait_console()  # so the stop below is a quick ACPI one
    vm.ct.systemctl("stop", f"vmhost@{vm.name}.socket")
    assert vm.show("ActiveState")["ActiveState"] == "inactive"  # stopped along with its socket
    assert vm.ct.run("test", "-e", vm.socket, check=False).returncode == 1  # RemoveOnStop=


def test_start_blocks_until_the_guest_is_ready(make_vm: Callable[..., VM]) -> None:
    """ready = "notify": the start job lasts until the guest's READY=1, STATUS= says what
    vmhost waits for; vmhostctl start prints how long the guest took."""
    vm = make_vm("ready", boot='ready = "notify"\nready_timeout_seconds = 120')
    vm.ct.systemctl("start", "--no-block", vm.unit)
    seen: list[tuple[str, str]] = []

    def booting() -> bool:
        props = vm.show("ActiveState", "StatusText")
        seen.append((props["ActiveState"], props["StatusText"]))
        return seen[-1][0] == "activating" and seen[-1][1].startswith("booting: ")

    wait_for("STATUS= while activating", booting, timeout=120)
    assert seen[-1][1].startswith("booting: waiting for READY=1 on org.vmhost.notify.0 since ")
    vm.ct.systemctl("start", vm.unit)  # joins the start job: back once it is done
    assert vm.active() == "active"
    ready = [r["MESSAGE"] for r in vm.records(f"MESSAGE_ID={Event.READY.message_id}")]
    assert len(ready) == 1 and "guest ready " in ready[0], ready
    assert vm.ctl("status", vm.name).stdout.startswith(f"{vm.name}: running (guest ready ")

    vm.ctl("stop", vm.name)
    assert vm.ended_cleanly()
    started = vm.ctl("start", vm.name).stdout
    assert re.match(rf"{vm.name}: running \(guest ready \d+\.\d+ s after QEMU started\)\n", started)


def test_a_boot_longer_than_timeout_start_sec_is_not_cut(make_vm: Callable[..., VM]) -> None:
    """EXTEND_TIMEOUT_USEC: a guest still within ready_timeout_seconds outlives TimeoutStartSec."""
    vm = make_vm("slowboot", boot='ready = "notify"', service="TimeoutStartSec=2")
    started = time.monotonic()
    vm.ct.systemctl("start", vm.unit)
    took = time.monotonic() - started
    assert took > 2, f"the guest was ready in {took:.1f} s: nothing was extended"
    assert (vm.active(), vm.show("NRestarts")["NRestarts"]) == ("active", "0")
    ready = vm.records(f"MESSAGE_ID={Event.READY.message_id}")
    assert len(ready) == 1 and "guest ready " in ready[0]["MESSAGE"], ready


def test_guest_never_ready_fails_without_restart(make_vm: Callable[..., VM]) -> None:
    """No READY=1 in time: the start fails with exit 8 after a graceful stop; no restart loop."""
    vm = make_vm(
        "notready",
        boot='ready = "notify"\nready_timeout_seconds = 20',
        cmdline="guest.never_ready=1",
    )
    started = time.monotonic()
    start = vm.ct.popen("systemctl", "start", vm.unit)

    def guest_status_passed_on() -> bool:
        props = vm.show("ActiveState", "StatusText")
        guest = "; guest: tinyguest: up, but never ready"
        return props["ActiveState"] == "activating" and props["StatusText"].endswith(guest)

    wait_for("the guest's STATUS= while activating", guest_status_passed_on, timeout=60)
    assert start.wait(timeout=60) != 0
    assert time.monotonic() - started >= 20
    time.sleep(3)  # longer than RestartSec=2
    props = vm.show("ActiveState", "Result", "ExecMainStatus", "NRestarts", "StatusText")
    assert (props["ActiveState"], props["Result"]) == ("failed", "exit-code"), props
    assert (props["ExecMainStatus"], props["NRestarts"]) == ("8", "0"), props
    assert "not ready within ready_timeout_seconds (20 s)" in props["StatusText"], props
    assert not vm.records(f"MESSAGE_ID={Event.READY.message_id}")
    assert vm.clean()
    vm.ct.systemctl("reset-failed", vm.unit, check=False)


def test_stop_while_booting_ends_cleanly(make_vm: Callable[..., VM]) -> None:
    """vmhostctl status and stop reach a booting VM's vmhost; the VM stops at once and the
    unit ends successfully (not failed for leaving before READY=1, so not restarted)."""
    vm = make_vm("bootstop", boot='ready = "notify"', cmdline="guest.never_ready=1")
    vm.ct.systemctl("start", "--no-block", vm.unit)
    vm.wait_console()
    assert vm.active() == "activating"
    status = vm.ctl("status", vm.name).stdout  # vmhost answers: a connect boots nothing more
    assert status.startswith(f"{vm.name}: booting (waiting for READY=1 on "), status
    vm.ctl("stop", vm.name)
    wait_for("the unit to end", lambda: vm.active() == "inactive", timeout=30)
    assert vm.ended_cleanly()
    assert vm.show("NRestarts")["NRestarts"] == "0"
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


def test_socket_group_members_may_control_the_vm(make_vm: Callable[..., VM]) -> None:
    """Socket root:vmhost 0660: a member's vmhostctl status and stop work; others are refused."""
    vm = make_vm("group")
    vm.ct.systemctl("start", vm.unit)
    mode = vm.ct.run("stat", "-c", "%a %U %G", vm.socket).stdout.split()
    assert mode == ["660", "root", "vmhost"]
    vm.ct.run("useradd", "--no-create-home", "--user-group", "--groups", "vmhost", "member")
    vm.ct.run("useradd", "--no-create-home", "--user-group", "outsider")

    def ctl_as(user: str, *args: str) -> subprocess.CompletedProcess[str]:
        setpriv = ("setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--")
        return vm.ct.run(*setpriv, str(vm.venv / "bin/vmhostctl"), *args, check=False)

    for command in ("status", "stop", "console"):
        refused = ctl_as("outsider", command, vm.name)
        assert (refused.returncode, refused.stdout) == (1, ""), refused
        assert "Permission denied" in refused.stderr
    assert vm.show("ActiveState")["ActiveState"] == "active"

    vm.wait_console()  # so the stop below is a quick ACPI one
    status = ctl_as("member", "status", vm.name)
    assert re.match(rf"{vm.name}: (starting|running)\n", status.stdout), status
    stopped = ctl_as("member", "stop", vm.name)
    assert stopped.returncode == 0, stopped
    wait_for("the service to stop", lambda: vm.show("ActiveState")["ActiveState"] == "inactive")


def test_list_does_not_wake_a_vm(make_vm: Callable[..., VM]) -> None:
    """vmhostctl list: a running VM with its QEMU pid and port; one whose socket waits for a
    connect is stopped, and the list does not start it."""
    up, asleep = make_vm("list-up"), make_vm("list-asleep")
    up.ct.systemctl("start", up.unit, f"vmhost@{asleep.name}.socket")
    info = json.loads(up.ctl("info", up.name, "--json").stdout)

    rows = {row["name"]: row for row in json.loads(up.ctl("list", "--json").stdout)}
    assert rows[up.name]["state"] in ("starting", "running"), rows
    assert (rows[up.name]["pid"], rows[up.name]["ssh_port"]) == (up.qemu_pid(), info["ssh_port"])
    assert rows[asleep.name]["state"] == "stopped", rows
    assert asleep.show("ActiveState")["ActiveState"] == "inactive"
    table = up.ctl("list").stdout.splitlines()
    assert [f"{asleep.name} stopped - - -"] == [
        " ".join(line.split()) for line in table if line.startswith(f"{asleep.name} ")
    ]


def test_status_and_stop_do_not_wake_a_vm(make_vm: Callable[..., VM]) -> None:
    """`vmhostctl status NAME` and `stop NAME` on a VM whose socket waits for a connect: it is
    stopped (exit 3, as systemctl status), stop has nothing to do, and neither starts it."""
    vm = make_vm("asleep")
    vm.ct.systemctl("start", f"vmhost@{vm.name}.socket")
    status = vm.ctl("status", vm.name, check=False)
    assert (status.returncode, status.stdout) == (3, f"{vm.name}: stopped\n"), status
    stop = vm.ctl("stop", vm.name, check=False)
    assert (stop.returncode, stop.stdout) == (0, f"{vm.name}: stopped\n"), stop
    assert json.loads(vm.ctl("status", vm.name, "--json", check=False).stdout)["state"] == (
        "stopped"
    )
    time.sleep(1)  # a start the connect triggered would show by now
    assert vm.show("ActiveState")["ActiveState"] == "inactive"
    assert vm.ct.run("test", "-S", vm.socket, check=False).returncode == 0  # still listening


def test_logs_of_a_vm_without_records(make_vm: Callable[..., VM]) -> None:
    """With a real journal: an unknown VM fails; a configured one that never ran says so."""
    quiet = make_vm("logs-quiet")
    unknown = quiet.ctl("logs", "logs-nosuch", check=False)
    assert (unknown.returncode, unknown.stdout) == (1, ""), unknown
    assert "no VM logs-nosuch: no /etc/vmhost/logs-nosuch.toml" in unknown.stderr
    empty = quiet.ctl("logs", quiet.name, check=False)
    assert (empty.returncode, empty.stdout) == (0, ""), empty
    assert f"no journal records with VMHOST_VM={quiet.name} in the local journal (/" in empty.stderr


def test_restart_keeps_the_socket(make_vm: Callable[..., VM]) -> None:
    """systemctl restart: the socket (same inode) stays; clients never see a refused connect,
    and the restart's stop half is not taken for a stop for good."""
    vm = make_vm("restart")
    vm.ct.systemctl("start", vm.unit)
    vm.wait_console()
    inode = vm.ct.run("stat", "-c", "%i", vm.socket).stdout
    before = vm.show("InvocationID")["InvocationID"]

    with hammered(vm) as seen:
        vm.ct.systemctl("restart", vm.unit)

    print(f"\nsystemctl restart under a client polling every 20 ms: {seen}")
    assert seen["errors"] == []
    assert seen["ok"] > 3
    assert seen["states"][-1] == "running", seen
    assert vm.show("InvocationID")["InvocationID"] != before
    assert vm.ct.run("stat", "-c", "%i", vm.socket).stdout == inode
    assert vm.show("NRestarts")["NRestarts"] == "0"
    assert vm.active(vm.socket_unit) == "active"


def test_reload_keeps_the_guest(make_vm: Callable[..., VM]) -> None:
    """systemctl reload: vmhost re-executes in place; same PIDs, no restart, no client refused."""
    vm = make_vm("reload")
    vm.ct.systemctl("start", vm.unit)
    vm.wait_console()
    before = vm.show("MainPID", "NRestarts", "InvocationID")
    qemu = vm.qemu_pid()
    process = [
        vm.ct.run("cat", f"/proc/{before['MainPID']}/{f}").stdout for f in ("comm", "cmdline")
    ]

    def reloaded() -> bool:
        return bool(vm.records(f"MESSAGE_ID={Event.RELOADED.message_id}"))

    with hammered(vm) as seen:
        started = time.monotonic()
        vm.ct.systemctl("reload", vm.unit)
        returned = time.monotonic() - started
        done_on_return = reloaded()
        wait_for("the reload", reloaded)
        wait_for("active again", lambda: vm.show("ActiveState")["ActiveState"] == "active")
    assert seen["errors"] == []
    assert seen["states"] == ["running"], seen
    assert vm.show("MainPID", "NRestarts", "InvocationID") == before
    assert vm.show("SubState")["SubState"] == "running"
    assert vm.qemu_pid() == qemu
    assert [
        vm.ct.run("cat", f"/proc/{before['MainPID']}/{f}").stdout for f in ("comm", "cmdline")
    ] == process
    (record,) = vm.records(f"MESSAGE_ID={Event.RELOADED.message_id}")
    print(
        f"\nsystemctl reload returned after {returned:.2f} s (reload done then: "
        f"{done_on_return}); {record['MESSAGE']}"
    )
    console = vm.records("SYSLOG_IDENTIFIER=vmhost-console")
    assert sum(READY_LINE in r["MESSAGE"] for r in console) == 1

    vm.ct.systemctl("stop", vm.unit)
    assert vm.show("Result", "ExecMainStatus") == {"Result": "success", "ExecMainStatus": "0"}
    assert vm.marker() == vm.token
    assert vm.clean()


def test_a_reloaded_vmhost_feeds_the_watchdog_at_once(make_vm: Callable[..., VM]) -> None:
    """systemd's watchdog clock runs on through a reload: the re-executed vmhost pings at once."""
    vm = make_vm("watchdog")
    vm.ct.systemctl("start", vm.unit)
    before = vm.show("MainPID", "InvocationID")

    def fed() -> str:
        return vm.show("WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]

    first = fed()
    wait_for("a ping", lambda: fed() != first, timeout=20)
    last = fed()  # the old process's next ping is half of WatchdogSec=30 away
    vm.ct.systemctl("reload", vm.unit)
    wait_for("a ping from the re-executed vmhost", lambda: fed() != last, timeout=5)
    assert vm.show("MainPID", "InvocationID") == before
    assert vm.show("NRestarts")["NRestarts"] == "0"


def test_qemu_killed_from_outside_is_restarted(make_vm: Callable[..., VM]) -> None:
    """SIGKILL to QEMU: vmhost exits 3 (crashed), Restart=on-failure starts the VM again;
    the socket is kept meanwhile."""
    vm = make_vm("crash")
    vm.ct.systemctl("start", vm.unit)
    first = vm.show("MainPID")["MainPID"]
    inode = vm.ct.run("stat", "-c", "%i", vm.socket).stdout
    socket_since = vm.show("ActiveEnterTimestampMonotonic", unit=vm.socket_unit)
    vm.ct.run("kill", "-KILL", str(vm.qemu_pid()))

    wait_for("a restart", lambda: vm.show("NRestarts")["NRestarts"] == "1")
    wait_for("active again", lambda: vm.show("ActiveState")["ActiveState"] == "active")
    assert vm.show("MainPID")["MainPID"] != first
    # The socket was kept: same inode, never left the active state.
    assert vm.ct.run("stat", "-c", "%i", vm.socket).stdout == inode
    assert vm.active(vm.socket_unit) == "active"
    assert vm.show("ActiveEnterTimestampMonotonic", unit=vm.socket_unit) == socket_since
    exits = vm.ct.journal(f"UNIT={vm.unit}", "EXIT_STATUS=3")
    assert exits, "systemd logged no exit status 3"
    crashed = vm.records(f"MESSAGE_ID={Event.CRASHED.message_id}")
    assert len(crashed) == 1, crashed


def test_qemu_killed_without_restart_leaves_the_unit_failed(make_vm: Callable[..., VM]) -> None:
    """The same crash with Restart=no: the unit is failed with exit status 3."""
    vm = make_vm("crash-norestart", service="Restart=no")
    vm.ct.systemctl("start", vm.unit)
    vm.ct.run("kill", "-KILL", str(vm.qemu_pid()))

    wait_for("failed", lambda: vm.show("ActiveState")["ActiveState"] == "failed")
    props = vm.show("Result", "ExecMainStatus", "StatusText")
    assert (props["Result"], props["ExecMainStatus"]) == ("exit-code", "3"), props
    assert not vm.ended_cleanly()


def test_bad_config_fails_without_restart(ct: Container) -> None:
    """A broken config: exit 78, STATUS= says why, and Restart= does not loop on it."""
    ct.write("/etc/vmhost/broken.toml", '[machine]\ncpus = "many"\n')
    unit = "vmhost@broken.service"
    try:
        assert ct.systemctl("start", unit, check=False).returncode != 0
        time.sleep(3)  # longer than RestartSec=2
        props = ct.show(unit, "ActiveState", "ExecMainStatus", "NRestarts", "StatusText")
        assert props["ActiveState"] == "failed"
        assert (props["ExecMainStatus"], props["NRestarts"]) == ("78", "0")
        assert "cpus" in props["StatusText"], props
        failed = ct.journal("VMHOST_VM=broken", f"MESSAGE_ID={Event.FAILED.message_id}")
        assert len(failed) == 1
    finally:
        ct.systemctl("stop", "vmhost@broken.socket", check=False)
        ct.systemctl("reset-failed", unit, check=False)


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


def test_logs_from_the_journal(make_vm: Callable[..., VM]) -> None:
    """vmhostctl logs: last N lines locally and over the control socket; -f sees new records."""
    vm = make_vm("logs")
    vm.ct.systemctl("start", vm.unit)
    vm.wait_console()

    line = re.compile(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (vmhost|vmhost-console): "
    )
    last3 = vm.ctl("logs", vm.name, "-n", "3").stdout.splitlines()
    assert len(last3) == 3 and all(line.match(x) for x in last3), last3
    local = vm.ctl("logs", vm.name, "-n", "500").stdout
    remote = vm.ctl("--socket", vm.socket, "logs", "-n", "500").stdout
    for out in (local, remote):
        assert f"vmhost-console: {READY_LINE}" in out
        assert f"vmhost: starting VM {vm.name}" in out

    ctl = f"{vm.venv}/bin/vmhostctl"
    follow = vm.ct.popen(
        "sh", "-c", 'echo $$; exec timeout 30 "$0" logs "$1" -f -n 0', ctl, vm.name
    )
    try:
        assert follow.stdout is not None
        pid = follow.stdout.readline().strip()
        wait_for("the follower watching the journal", lambda: watching(vm.ct, pid))
        vm.ctl("stop", vm.name)
        followed = []
        for text in follow.stdout:
            followed.append(text)
            if "stopped" in text:
                break
        assert any("stopping" in x for x in followed), followed
        vm.ct.run("kill", pid, check=False)
    finally:
        follow.wait(timeout=30)


def test_log_reader_edges(ct: Container, venv: Path) -> None:
    """entries(): no record, one record, the true last N (libsystemd 253 steps one too far)."""
    python = str(venv / "bin/python")

    def send(name: str, *messages: str) -> None:
        # From inside vmhost@NAME.service: logs trust only records of the VM's own unit.
        ct.write(f"/run/e2e/{name}.messages", "\n".join(messages))
        ct.write(
            f"/etc/systemd/system/vmhost@{name}.service.d/send.conf",
            "[Service]\nType=oneshot\nRestart=no\nRestartForceExitStatus=\nExecStopPost=\nExecStart=\n"
            f"ExecStart={python} /run/e2e/send_logs.py %i\n",
        )
        ct.systemctl("daemon-reload")
        ct.systemctl("start", f"vmhost@{name}.service")
        ct.systemctl("stop", f"vmhost@{name}.socket")
        ct.run("journalctl", "--sync")

    def read(name: str, lines: int, count: int = 99) -> list[str]:
        out = ct.run(python, "/run/e2e/read_logs.py", name, str(lines), "tail", str(count))
        return out.stdout.splitlines()

    def follow(name: str, lines: int, count: int) -> subprocess.Popen[str]:
        reader = ct.popen(
            "sh", "-c", 'echo $$; exec "$0" "$@"', python, "/run/e2e/read_logs.py",
            name, str(lines), "follow", str(count),
        )  # fmt: skip
        assert reader.stdout is not None
        pid = reader.stdout.readline().strip()
        wait_for(f"the reader of {name} watching the journal", lambda: watching(ct, pid))
        return reader

    assert read("edge-none", 5) == []
    reader = follow("edge-none", 5, 2)
    send("edge-none", "first", "second")
    assert reader.communicate(timeout=20)[0].splitlines() == ["first", "second"]

    send("edge-one", "only")
    assert read("edge-one", 5) == ["only"]

    send("edge-three", "a", "b", "c")
    assert read("edge-three", 2) == ["b", "c"]
    assert read("edge-three", 0) == []
    reader = follow("edge-three", 1, 2)
    send("edge-three", "d")
    assert reader.communicate(timeout=20)[0].splitlines() == ["c", "d"]
    reader = follow("edge-three", 0, 1)
    send("edge-three", "e")
    assert reader.communicate(timeout=20)[0].splitlines() == ["e"]


def test_kvm_opens_in_the_sandbox(ct: Container) -> None:
    """The unit's private /dev still has /dev/kvm, and it opens read-write.

    The container's systemd enforces no device cgroup (not delegated on this
    host), so DeviceAllow= itself is only proven on a real host.
    """
    if not Path("/dev/kvm").exists():
        pytest.skip("no /dev/kvm on this host")
    probe = (
        "import os; os.close(os.open('/dev/kvm', os.O_RDWR)); assert not os.path.exists('/dev/mem')"
    )
    ct.write(
        "/etc/systemd/system/vmhost@kvm.service.d/probe.conf",
        # No ExecStopPost=: the probe's exit 0 is not a VM stopped for good.
        "[Service]\nType=oneshot\nRestart=no\nRestartForceExitStatus=\nExecStopPost=\n"
        f'ExecStart=\nExecStart=/usr/bin/python3 -c "{probe}"\n',
    )
    ct.systemctl("daemon-reload")
    try:
        started = ct.systemctl("start", "vmhost@kvm.service", check=False)
        assert started.returncode == 0, ct.run("journalctl", "-u", "vmhost@kvm", "-o", "cat").stdout
    finally:
        ct.systemctl("stop", "vmhost@kvm.socket", check=False)


def test_units_verify_and_exposure(ct: Container) -> None:
    """systemd-analyze verify is clean; the live security exposure is at most 2.0."""
    # The units' man pages come with the package (test_deb verifies with them); not here.
    verify = ct.run(
        "systemd-analyze", "verify", "--man=no", "vmhost@x.service", "vmhost@x.socket", check=False
    )
    assert (verify.returncode, verify.stdout, verify.stderr) == (0, "", "")
    security = ct.run("systemd-analyze", "security", "--no-pager", "vmhost@x.service").stdout
    found = re.search(r"Overall exposure level for vmhost@x\.service: (\d+\.\d+)", security)
    assert found, security[-500:]
    assert float(found[1]) <= 2.0
    print(f"\nsystemd-analyze security vmhost@x.service: {found[1]}")
    print("\n".join(x for x in security.splitlines() if x.startswith(("✗", "→"))))
