"""vmhost@NAME as a machine of systemd-machined (issue 26), under a real systemd with D-Bus.

The container runs the host's dbus-daemon and systemd-machined (bus-activated
on the first call), so ``machinectl`` works inside it as on a host.  Runs in
its own container, with the VM helpers of systemd_vm.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from uuid import UUID, uuid5

import pytest
from container import Container
from guest.build import GuestImage
from systemd_vm import (
    READY_LINE,
    UNIT_FAILURE,
    UNIT_SUCCESS,
    VM,
    ct,
    make_vm,
    venv,
    wait_for,
)

from vmhost.journal import Event
from vmhost.machined import NAMESPACE

__all__ = ["ct", "make_vm", "venv"]  # fixtures, used by name
pytestmark = pytest.mark.slow

UUID_LINE = "TINYGUEST UUID "
NOT_REGISTERED = "not registered with systemd-machined"


def machine(vm: VM) -> dict[str, str]:
    """``machinectl show NAME``; empty when machined has no such machine."""
    shown = vm.ct.run("machinectl", "show", vm.name, check=False)
    return dict(line.split("=", 1) for line in shown.stdout.splitlines() if "=" in line)


def listed(ct: Container) -> list[list[str]]:
    """``machinectl list`` rows: machine, class, service, ..."""
    out = ct.run("machinectl", "list", "--no-legend", "--no-pager").stdout
    return [line.split() for line in out.splitlines() if line.strip()]


def guest_uuid(vm: VM) -> UUID:
    """The SMBIOS UUID the guest printed last (its /sys/class/dmi/id/product_uuid)."""
    vm.wait_console(UUID_LINE)
    lines = [r["MESSAGE"] for r in vm.records("SYSLOG_IDENTIFIER=vmhost-console")]
    return UUID([x for x in lines if UUID_LINE in x][-1].split(UUID_LINE, 1)[1].strip())


def messages(vm: VM, text: str) -> list[str]:
    return [r["MESSAGE"] for r in vm.records("SYSLOG_IDENTIFIER=vmhost") if text in r["MESSAGE"]]


def started(vm: VM) -> dict[str, str]:
    """Start the unit, wait for the guest; its registration."""
    vm.ct.systemctl("start", vm.unit)
    vm.wait_console()
    return machine(vm)


def test_machinectl_lists_and_shows_the_vm(make_vm: Callable[..., VM]) -> None:
    """list: class vm, service vmhost; show: leader = MainPID, the unit, the guest's SMBIOS UUID."""
    vm = make_vm("shown")
    shown = started(vm)

    assert [vm.name, "vm", "vmhost"] in [row[:3] for row in listed(vm.ct)]
    assert shown["Leader"] == vm.show("MainPID")["MainPID"]
    assert (shown["Unit"], shown["Class"], shown["Service"], shown["State"]) == (
        vm.unit,
        "vm",
        "vmhost",
        "running",
    ), shown
    assert UUID(hex=shown["Id"]) == guest_uuid(vm) == uuid5(NAMESPACE, vm.name)
    status = vm.ct.run("machinectl", "status", "--no-pager", vm.name).stdout
    assert f"Unit: {vm.unit}" in status, status
    assert str(vm.qemu_pid()) in status, status  # QEMU is in the machine's cgroup
    assert len(messages(vm, "registered with systemd-machined")) == 1


def test_configured_uuid_is_the_guests_and_machineds(make_vm: Callable[..., VM]) -> None:
    """machine.uuid in the config: the guest and machinectl both see that one."""
    vm = make_vm("chosen")
    chosen = UUID("0f9d6c1e-7a53-4e0c-9b8e-2b4f6a1d3c5e")
    config = f"/etc/vmhost/{vm.name}.toml"
    text = vm.ct.run("cat", config).stdout.replace("[machine]\n", f'[machine]\nuuid = "{chosen}"\n')
    vm.ct.write(config, text)
    shown = started(vm)
    assert UUID(hex=shown["Id"]) == guest_uuid(vm) == chosen


def test_machinectl_poweroff_stops_the_guest_cleanly(make_vm: Callable[..., VM]) -> None:
    """poweroff: SIGRTMIN+4, the graceful chain, a clean disk, a success; the machine is gone."""
    vm = make_vm("poweroff")
    started(vm)
    vm.ct.run("machinectl", "poweroff", vm.name)
    wait_for("the unit to stop", lambda: vm.active() == "inactive", timeout=30)

    assert vm.ended_cleanly()
    assert messages(vm, "SIGRTMIN+4 received")
    shutdowns = [r["MESSAGE"] for r in vm.records("QMP_EVENT=SHUTDOWN")]
    assert any("guest-shutdown" in m for m in shutdowns), shutdowns  # ACPI, not a kill
    assert vm.marker() == vm.token
    assert vm.clean()
    assert machine(vm) == {}
    assert vm.active(vm.socket_unit) == "inactive"  # down for good: the socket too


def test_machinectl_terminate_stops_the_unit_gracefully(make_vm: Callable[..., VM]) -> None:
    """terminate: machined stops the unit, so SIGTERM, the graceful chain, a clean disk."""
    vm = make_vm("terminate")
    started(vm)
    vm.ct.run("machinectl", "terminate", vm.name)
    wait_for("the unit to stop", lambda: vm.active() == "inactive", timeout=30)

    assert vm.ended_cleanly()
    assert messages(vm, "SIGTERM received")
    shutdowns = [r["MESSAGE"] for r in vm.records("QMP_EVENT=SHUTDOWN")]
    assert any("guest-shutdown" in m for m in shutdowns), shutdowns
    assert vm.clean()
    assert machine(vm) == {}
    assert vm.active(vm.socket_unit) == "inactive"


def test_machinectl_reboot_powers_off_and_boots_again(make_vm: Callable[..., VM]) -> None:
    """reboot (SIGINT): graceful power-off, exit 7, a successful restart, same UUID, new leader."""
    vm = make_vm("reboot")
    before = started(vm)
    first = vm.show("MainPID")["MainPID"]
    vm.ct.run("machinectl", "reboot", vm.name)

    wait_for("a restart", lambda: vm.show("NRestarts")["NRestarts"] == "1", timeout=30)
    wait_for("active again", lambda: vm.active() == "active")
    wait_for("a second boot", lambda: vm.marker().split() == [vm.token, vm.token])
    vm.wait_console()
    assert messages(vm, "SIGINT received: reboot")
    shutdowns = [r["MESSAGE"] for r in vm.records("QMP_EVENT=SHUTDOWN")]
    assert any("guest-shutdown" in m for m in shutdowns), shutdowns  # powered off, not killed
    # Exit 7 is a success (SuccessExitStatus=), restarted all the same (RestartForceExitStatus=).
    said = vm.ct.journal(f"UNIT={vm.unit}", "_PID=1")
    ids = [r.get("MESSAGE_ID") for r in said]
    assert UNIT_FAILURE not in ids, [r["MESSAGE"] for r in said]
    assert "restart counter is at 1" in said[ids.index(UNIT_SUCCESS) + 1]["MESSAGE"]
    second = vm.show("MainPID")["MainPID"]
    assert second != first
    wait_for("the new leader", lambda: machine(vm).get("Leader") == second)
    assert machine(vm)["Id"] == before["Id"]

    vm.ct.systemctl("stop", vm.unit)
    assert vm.show("Result")["Result"] == "success"
    assert vm.clean()


def test_foreground_ctrl_c_still_stops(ct: Container, venv: Path, guest: GuestImage) -> None:
    """A shell's vmhost serve: SIGINT stops the VM (exit 0); one warning says why not registered."""
    name = "fg"
    vm_dir = f"/var/lib/vmhost/{name}"
    ct.run("mkdir", "-p", vm_dir)
    ct.run("cp", "--sparse=always", str(guest.disk), f"{vm_dir}/disk.img")
    ct.write(
        f"/etc/vmhost/{name}.toml",
        f'[boot]\nkernel = "{guest.kernel}"\ninitrd = "{guest.initrd}"\n'
        f'cmdline = "console=ttyS0 quiet panic=-1"\n[[disks]]\npath = "{vm_dir}/disk.img"\n',
    )
    serve = ct.popen("sh", "-c", f"exec {venv}/bin/vmhost serve {name} --pid-file /run/fg.pid 2>&1")
    try:
        console = f"{vm_dir}/console.log"
        wait_for("the guest", lambda: READY_LINE in ct.run("cat", console, check=False).stdout)
        ct.run("sh", "-c", "kill -INT $(cat /run/fg.pid)")
        out, _ = serve.communicate(timeout=60)
    finally:
        serve.kill()
    assert serve.returncode == 0, out
    assert out.count(NOT_REGISTERED) == 1, out
    assert "not run as a systemd service" in out
    assert re.search(r"SIGINT received$", out, re.M), out  # a stop, not a reboot


def test_reload_keeps_the_registration(make_vm: Callable[..., VM]) -> None:
    """systemctl reload (a re-exec, same PID): the very same registration, never dropped."""
    vm = make_vm("reload")
    before = started(vm)
    vm.ct.systemctl("reload", vm.unit)
    wait_for("the reload", lambda: bool(vm.records(f"MESSAGE_ID={Event.RELOADED.message_id}")))
    after = machine(vm)
    assert after == before  # Timestamp included: not registered anew
    assert messages(vm, "kept with systemd-machined")
    vm.ct.systemctl("stop", vm.unit)
    assert machine(vm) == {}


def test_restart_after_a_crash_registers_the_new_vmhost(make_vm: Callable[..., VM]) -> None:
    """After a crash's restart machined still has the dead leader: the new vmhost replaces it."""
    vm = make_vm("crash")
    started(vm)
    vm.ct.run("kill", "-KILL", str(vm.qemu_pid()))
    wait_for("a restart", lambda: vm.show("NRestarts")["NRestarts"] == "1")
    wait_for("active again", lambda: vm.active() == "active")
    main = vm.show("MainPID")["MainPID"]
    wait_for("the new leader", lambda: machine(vm).get("Leader") == main)
    assert messages(vm, "registered again (in place of PID")
    assert not messages(vm, NOT_REGISTERED)


@pytest.mark.parametrize("why", ["masked", "register_machine = false"])
def test_vm_starts_without_machined(make_vm: Callable[..., VM], why: str) -> None:
    """machined masked: the VM starts, with one warning; register_machine = false: no warning."""
    vm = make_vm("nomachined" if why == "masked" else "optout")
    if why == "masked":
        vm.ct.systemctl("mask", "--runtime", "--now", "systemd-machined.service")
    else:
        config = f"/etc/vmhost/{vm.name}.toml"
        vm.ct.write(
            config, vm.ct.run("cat", config).stdout + "[systemd]\nregister_machine = false\n"
        )
    try:
        vm.ct.systemctl("start", vm.unit)
        vm.wait_console()
        assert vm.active() == "active"
        assert machine(vm) == {}
        warnings = messages(vm, NOT_REGISTERED)
        if why == "masked":
            assert len(warnings) == 1, warnings
            (record,) = [r for r in vm.records() if NOT_REGISTERED in r["MESSAGE"]]
            assert record["PRIORITY"] == "4"  # warning
        else:
            assert warnings == []
    finally:
        if why == "masked":
            vm.ct.systemctl("unmask", "--runtime", "systemd-machined.service")


def test_a_name_taken_by_another_machine_is_left_alone(make_vm: Callable[..., VM]) -> None:
    """Another unit's machine has the name: one warning, the VM starts, the other keeps it."""
    vm = make_vm("taken")
    vm.ct.run("systemd-run", "--unit=squatter", "sleep", "infinity")
    try:
        leader = vm.ct.show("squatter.service", "MainPID")["MainPID"]
        register = ("org.freedesktop.machine1.Manager", "RegisterMachine", "sayssus")
        path = ("org.freedesktop.machine1", "/org/freedesktop/machine1")
        vm.ct.run("busctl", "call", *path, *register, vm.name, "0", "", "container", leader, "")
        vm.ct.systemctl("start", vm.unit)
        vm.wait_console()
        assert vm.active() == "active"
        assert (machine(vm)["Unit"], machine(vm)["Leader"]) == ("squatter.service", leader)
        assert messages(vm, NOT_REGISTERED) == [
            f"{NOT_REGISTERED}: the name '{vm.name}' is another machine's"
        ]
    finally:
        vm.ct.systemctl("stop", "squatter.service")


def test_exposure_stays_at_most_1_5(ct: Container) -> None:
    """systemd-analyze security rates the unit that registers with machined at 1.5 or better."""
    security = ct.run("systemd-analyze", "security", "--no-pager", "vmhost@x.service").stdout
    found = re.search(r"Overall exposure level for vmhost@x\.service: (\d+\.\d+)", security)
    assert found, security[-500:]
    print(f"\nsystemd-analyze security vmhost@x.service: {found[1]}")
    assert float(found[1]) <= 1.5
