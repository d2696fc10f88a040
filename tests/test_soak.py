"""The fault soak (issue 29): VMs under a real systemd, random operations and faults, every
invariant checked after every step (tests/soak.py).  The short run is part of the default test
run; the long one is ``-m soak --soak-vms N --soak-minutes M [--soak-seed S]``."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from container import Container
from guest.build import GuestImage
from soak import Soak
from systemd_vm import VM, ct, install_vm, venv

__all__ = ["ct", "venv"]  # fixtures, used by name
pytestmark = pytest.mark.slow


def make_vms(ct: Container, venv: Path, guest: GuestImage, prefix: str, count: int) -> list[VM]:
    """COUNT VMs with the tiny guest and its agent (a stop asks it first; it can power off); each
    guest reboots by itself on its first boot, and again after the soak removes /rebooted."""
    vms = []
    for i in range(count):
        name = f"{prefix}{i}"
        agent = "[agent]\nport = 1024\n"
        vm = install_vm(
            ct, venv, guest, name, cmdline="guest.reboot_once=1", toml=agent, timeout=20
        )
        vms.append(vm)
    return vms


def soak(
    ct: Container, venv: Path, guest: GuestImage, config: pytest.Config, vms: int, minutes: float
) -> None:
    seed = config.getoption("--soak-seed")
    seed = random.SystemRandom().randrange(2**32) if seed is None else seed
    print(f"\nsoak seed {seed} (replay: --soak-seed {seed})", flush=True)
    machines = make_vms(ct, venv, guest, f"s{seed % 1000}-", vms)
    try:
        Soak(ct, venv, machines, seed).run(minutes, log=lambda line: print(line, flush=True))
    finally:
        for vm in machines:
            ct.systemctl("stop", vm.unit, vm.socket_unit, check=False)


def test_soak_short(
    ct: Container, venv: Path, guest: GuestImage, pytestconfig: pytest.Config
) -> None:
    """Three VMs for two minutes of random operations and faults: no invariant is violated."""
    soak(ct, venv, guest, pytestconfig, vms=3, minutes=2)


@pytest.mark.soak
def test_soak_long(
    ct: Container, venv: Path, guest: GuestImage, pytestconfig: pytest.Config
) -> None:
    """--soak-vms VMs for --soak-minutes of random operations and faults: no violation."""
    vms, minutes = pytestconfig.getoption("--soak-vms"), pytestconfig.getoption("--soak-minutes")
    soak(ct, venv, guest, pytestconfig, vms=vms, minutes=minutes)
