"""vmhost@NAME in a booted systemd container: the venv it runs from, the units and group as the
package installs them, a VM's config and disk, the handle tests see it through, and the
Go-style clients run beside it.  Shared by the e2e tests, the soak and the fleet."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import container
import pytest
from conftest import free_port, prerequisite_missing
from container import Container, ContainerUnavailable
from guest.build import GuestImage

UNITS = (container.REPO / "units/vmhost@.socket", container.REPO / "units/vmhost@.service")
SYSUSERS = container.REPO / "units/sysusers.d/vmhost.conf"
READY_LINE = "TINYGUEST READY"
# systemd's catalog: "Deactivated successfully" and "Failed with result ...".
UNIT_SUCCESS = "7ad2d189f7e94e70a38c781354912448"
UNIT_FAILURE = "d9b373ed55a64feb8242e02dbe79a49c"

# A Go-style peer: a connection per request, a 30 s deadline; counts replies until told to stop.
HAMMER = """
import json, os, socket, sys, time
path, stop_file = sys.argv[1], sys.argv[2]
ok, errors, states, after_stop = 0, [], [], 0
while after_stop < 3:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(path)
            s.sendall(b'{"method":"status"}\\n')
            reply = json.loads(s.makefile().readline())
        ok += 1
        if not states or states[-1] != reply.get("state"):
            states.append(reply.get("state"))
    except Exception as e:
        errors.append(repr(e))
    if os.path.exists(stop_file):
        after_stop += 1
    time.sleep(0.02)
print(json.dumps({"ok": ok, "errors": errors, "states": states}))
"""

STATUS = '{"method":"status"}'

# A Go client's one request: connect, write a line, read a line.
ASK = """
import socket, sys
with socket.socket(socket.AF_UNIX) as s:
    s.settimeout(30)
    s.connect(sys.argv[1])
    s.sendall(sys.argv[2].encode() + b"\\n")
    print(s.makefile().readline(), end="")
"""


@contextlib.contextmanager
def booted(
    name: str, venv: Path, *guests: GuestImage, binds: Sequence[str] = ()
) -> Iterator[Container]:
    """A container booted with vmhost installed as the package installs it: the units, the
    vmhost group (SocketGroup=), the clients.  VENV and the guests' kernels are bound read-only;
    the checkout is not (see venv())."""
    ro_binds = sorted({str(venv), *(str(guest.kernel.parent) for guest in guests)})
    with container.boot(name, binds=binds, ro_binds=ro_binds) as ct:
        ct.write(f"/etc/sysusers.d/{SYSUSERS.name}", SYSUSERS.read_text())
        ct.run("systemd-sysusers")
        ct.install_units(UNITS, venv)
        ct.write("/run/e2e/ask.py", ASK)
        ct.write("/run/e2e/hammer.py", HAMMER)
        yield ct


@pytest.fixture(scope="module")
def ct(request: pytest.FixtureRequest, venv: Path, guest: GuestImage) -> Iterator[Container]:
    """One container per test module, named after it."""
    module = request.module.__name__.removeprefix("test_").replace("_", "-")
    with booted(f"vmhost-{module}", venv, guest) as machine:
        yield machine


@pytest.fixture(scope="module")
def venv() -> Path:
    try:
        container.require_host()
        return container.venv()
    except ContainerUnavailable as e:
        prerequisite_missing(f"cannot start a systemd container here: {e}")


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


@dataclass
class VM:
    """vmhost@NAME inside the container, seen through systemctl, the journal and vmhostctl."""

    ct: Container
    name: str
    token: str
    venv: Path

    @property
    def unit(self) -> str:
        return f"vmhost@{self.name}.service"

    @property
    def socket(self) -> str:
        return f"/run/vmhost/{self.name}/vmhost.sock"

    @property
    def disk(self) -> str:
        return f"/var/lib/vmhost/{self.name}/disk.img"

    def show(self, *props: str, unit: str = "") -> dict[str, str]:
        return self.ct.show(unit or self.unit, *props)

    @property
    def socket_unit(self) -> str:
        return f"vmhost@{self.name}.socket"

    def active(self, unit: str = "") -> str:
        return self.show("ActiveState", unit=unit)["ActiveState"]

    def ended_cleanly(self) -> bool:
        """systemd's last word on the unit is "Deactivated successfully" (vmhost exited 0).

        From the journal: once the service and its socket are both down, systemd
        unloads the unit, and ``systemctl show`` has nothing but defaults left.
        """
        said = [
            r["MESSAGE_ID"]
            for r in self.ct.journal(f"UNIT={self.unit}", "_PID=1")
            if r.get("MESSAGE_ID") in (UNIT_SUCCESS, UNIT_FAILURE)
        ]
        return said[-1:] == [UNIT_SUCCESS]

    def ask(self, request: str) -> str:
        """One request over the control socket, as a Go client sends it; the answer line."""
        return self.ct.run("/usr/bin/python3", "/run/e2e/ask.py", self.socket, request).stdout

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.ct.run(str(self.venv / "bin/vmhostctl"), *args, check=check)

    def records(self, *matches: str) -> list[dict[str, Any]]:
        return self.ct.journal(f"VMHOST_VM={self.name}", *matches)

    def wait_console(self, text: str = READY_LINE) -> None:
        def seen() -> bool:
            console = self.records("SYSLOG_IDENTIFIER=vmhost-console")
            return any(text in r["MESSAGE"] for r in console)

        wait_for(f"{text!r} on the console of {self.name}", seen)

    def qemu_pid(self) -> int:
        """vmhost's one child (QEMU renames itself after the VM, so no comm check)."""
        main = self.show("MainPID")["MainPID"]
        (child,) = self.ct.run("cat", f"/proc/{main}/task/{main}/children").stdout.split()
        return int(child)

    def process(self) -> tuple[str, str]:
        """The main process's name and command line."""
        main = self.show("MainPID")["MainPID"]
        comm, cmdline = (
            self.ct.run("cat", f"/proc/{main}/{f}").stdout for f in ("comm", "cmdline")
        )
        return comm, cmdline

    def marker(self) -> str:
        return self.ct.run("debugfs", "-R", "cat /marker", self.disk).stdout.strip()

    def clean(self) -> bool:
        return "needs_recovery" not in self.ct.run("dumpe2fs", "-h", self.disk).stdout


def install_vm(
    ct: Container,
    venv: Path,
    image: GuestImage,
    name: str,
    *,
    cmdline: str = "",
    boot: str = "",
    machine: str = "",
    toml: str = "",
    timeout: int = 10,
    ssh_port: int = 0,
) -> VM:
    """Config, kernel, initrd and a fresh disk for vmhost@NAME in the container; the strings
    are added to [boot]'s cmdline, [boot], [machine] and the end of the config."""
    vm = VM(ct, name, f"{name}-{os.urandom(4).hex()}", venv)
    vm_dir = f"/var/lib/vmhost/{name}"  # the unit's /var/tmp is private
    ct.run("mkdir", "-p", vm_dir)
    ct.run("cp", str(image.kernel), f"{vm_dir}/vmlinuz")
    ct.run("cp", str(image.initrd), f"{vm_dir}/initrd.img")
    ct.run("cp", "--sparse=always", str(image.disk), vm.disk)
    ct.write(
        f"/etc/vmhost/{name}.toml",
        f"""\
[machine]
accel = "auto"
{machine}
[boot]
kernel = "{vm_dir}/vmlinuz"
initrd = "{vm_dir}/initrd.img"
cmdline = "console=ttyS0 quiet panic=-1 guest.token={vm.token} {cmdline}"
{boot}
[[disks]]
path = "{vm.disk}"
[network]
ssh_port = {ssh_port or free_port()}
[stop]
timeout_seconds = {timeout}
{toml}""",
    )
    return vm


@pytest.fixture
def make_vm(ct: Container, venv: Path, guest: GuestImage) -> Iterator[Callable[..., VM]]:
    """Config, kernel, initrd and a fresh disk for vmhost@NAME; both units stopped afterwards."""
    made: list[VM] = []

    def make(
        name: str,
        *,
        image: GuestImage = guest,
        timeout: int = 10,
        service: str = "",
        cmdline: str = "",
        boot: str = "",
    ) -> VM:
        vm = install_vm(ct, venv, image, name, cmdline=cmdline, boot=boot, timeout=timeout)
        if service:
            ct.write(f"/etc/systemd/system/{vm.unit}.d/test.conf", f"[Service]\n{service}\n")
            ct.systemctl("daemon-reload")
        made.append(vm)
        return vm

    yield make
    for vm in made:
        ct.systemctl("stop", f"vmhost@{vm.name}.socket", vm.unit, check=False)


@contextlib.contextmanager
def hammered(vm: VM) -> Iterator[dict[str, Any]]:
    """A Go-style status poller runs around the block; its tally is filled in at the end."""
    stop_file = f"/run/e2e/{vm.name}.done"
    hammer = vm.ct.popen("/usr/bin/python3", "/run/e2e/hammer.py", vm.socket, stop_file)
    seen: dict[str, Any] = {}
    try:
        time.sleep(0.5)
        yield seen
        vm.ct.run("touch", stop_file)
        out, _ = hammer.communicate(timeout=60)
    finally:
        hammer.kill()
    seen.update(json.loads(out))
