"""vmhost@NAME restarted, reloaded and crashed under a real systemd: the socket and the guest
are kept where they should be, the watchdog is fed, and Restart= does what the unit says."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from systemd_vm import READY_LINE, VM, ct, hammered, make_vm, venv, wait_for

from vmhost.journal import Event

__all__ = ["ct", "make_vm", "venv"]  # fixtures, used by name
pytestmark = pytest.mark.slow


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
