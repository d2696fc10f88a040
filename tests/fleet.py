"""A fleet of tiny-guest VMs under a container's systemd, started and stopped all at once: the
scale test's (tests/test_scale.py) and the density bench's (bench/density.py) one recipe.

Guests get 80 MiB, the least the tiny guest's stock Debian kernel boots in (the issue asks 64):
at 64 MiB it cannot even decompress itself (its bzImage asks 51.5 MiB for that), at 72 the
booted kernel runs out of memory.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import free_port
from container import Container
from guest.build import GuestImage
from systemd_vm import READY_LINE, VM, install_vm

MEMORY_MIB = 80
STOP_TIMEOUT = 30
"""Each VM's ``[stop] timeout_seconds``: its deadline for a graceful stop."""


@dataclass
class Started:
    """What starting them all at once took, in seconds."""

    units_active: float
    guests_ready: float


def make_fleet(ct: Container, venv: Path, guest: GuestImage, count: int) -> list[VM]:
    """COUNT configured VMs, tiny guests of MEMORY_MIB each, not started."""
    return [
        install_vm(  # named to be listed in order
            ct,
            venv,
            guest,
            f"vm{i:02d}",
            machine=f"memory_mib = {MEMORY_MIB}",
            ssh_port=free_port(),
            timeout=STOP_TIMEOUT,
        )
        for i in range(1, count + 1)
    ]


def start_all(ct: Container, vms: Sequence[VM]) -> Started:
    """``systemctl start`` of them all in one command; then until every guest says READY."""
    began = time.monotonic()
    start = ct.run("systemctl", "start", *(vm.unit for vm in vms), timeout=600, check=False)
    active = time.monotonic() - began
    states = {vm.name: vm.show("ActiveState", "SubState", "NRestarts") for vm in vms}
    first_time = {"ActiveState": "active", "SubState": "running", "NRestarts": "0"}
    failed = [vm for vm in vms if states[vm.name] != first_time]
    assert start.returncode == 0 and not failed, (start.stderr, *map(_evidence, failed))
    pending = {vm.name for vm in vms}
    deadline = began + 60 + 15 * len(vms)  # TCG boots share two cores
    while pending:
        console = ct.journal("SYSLOG_IDENTIFIER=vmhost-console")
        pending -= {r.get("VMHOST_VM") for r in console if READY_LINE in str(r.get("MESSAGE"))}
        assert time.monotonic() < deadline, f"guests not ready: {sorted(pending)}"
        time.sleep(0.5)
    return Started(active, time.monotonic() - began)


def _evidence(vm: VM) -> str:
    unit = vm.ct.run("journalctl", "--no-pager", "-n", "40", "-u", vm.unit, check=False).stdout
    return f"--- {vm.name}: {vm.show('ActiveState', 'Result', 'NRestarts')}\n{unit}"


def timed_list(vm: VM, runs: int = 3) -> tuple[float, list[dict[str, Any]]]:
    """The median wall time of ``vmhostctl list --json`` (process start included), its rows."""
    times, rows = [], []
    for _ in range(runs):
        began = time.monotonic()
        out = vm.ctl("list", "--json").stdout
        times.append(time.monotonic() - began)
        rows = json.loads(out)
    return statistics.median(times), rows


def stop_all(ct: Container) -> float:
    """``systemctl stop 'vmhost@*'``, every service and socket at once; the seconds it took."""
    began = time.monotonic()
    ct.run("systemctl", "stop", "vmhost@*", timeout=300)
    return time.monotonic() - began
