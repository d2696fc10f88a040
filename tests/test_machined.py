"""vmhost.machined without machined: the UUID, and every way a registration is skipped or fails.

What machined does with a registration is proven under a real systemd in
test_machined_e2e; here a real dbus-daemon stands in for a system bus that
has no machined, and plain sockets for a missing or silent bus.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest

from vmhost import machined
from vmhost.config import Config, MachineConfig, SystemdConfig

NOT_REGISTERED = "not registered with systemd-machined"


def test_uuid_is_derived_from_the_name_unless_configured() -> None:
    """The default is uuid5 of the name, fixed, host-independent; a configured one wins."""
    assert machined.machine_uuid(MachineConfig(), "demo") == UUID(
        "c2fc1deb-03d4-5ce5-9e02-0d906229289b"
    )
    assert machined.machine_uuid(MachineConfig(), "demo2") != machined.machine_uuid(
        MachineConfig(), "demo"
    )
    chosen = UUID("0f9d6c1e-7a53-4e0c-9b8e-2b4f6a1d3c5e")
    assert machined.machine_uuid(MachineConfig(uuid=chosen), "demo") == chosen


def test_the_service_does_not_import_the_dbus_library() -> None:
    """jeepney is loaded only when a registration is attempted, not with the service's code."""
    code = "import sys, vmhost.service; print('jeepney' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "False\n"


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_opting_out_asks_nothing_and_says_nothing(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """register_machine = false: no registration, no warning, even as a service."""
    monkeypatch.setattr(machined, "is_service", lambda: True)
    config = Config(systemd=SystemdConfig(register_machine=False))
    assert await machined.register("vm", config) is False
    assert caplog.records == []


async def test_outside_systemd_one_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From a shell (no $INVOCATION_ID): no registration, one warning saying why."""
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    assert machined.is_service() is False
    assert await machined.register("vm", Config()) is False
    assert warnings(caplog) == [f"{NOT_REGISTERED}: not run as a systemd service"]


@pytest.fixture
def as_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machined, "is_service", lambda: True)


@pytest.mark.usefixtures("as_service")
async def test_no_system_bus_one_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """No socket at the bus address: the VM's start goes on, with one warning."""
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/none")
    assert await machined.register("vm", Config()) is False
    (warning,) = warnings(caplog)
    assert warning.startswith(f"{NOT_REGISTERED}: no system bus: [Errno 2]"), warning


@pytest.mark.usefixtures("as_service")
async def test_silent_bus_is_given_up_in_time(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A bus that accepts and never answers (a hung dbus-daemon): given up after TIMEOUT."""
    path = tmp_path / "bus"
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(path))
        listening.listen()
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={path}")
        monkeypatch.setattr(machined, "TIMEOUT", 0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await machined.register("vm", Config()) is False
        assert loop.time() - started < 2
    assert warnings(caplog) == [f"{NOT_REGISTERED}: no answer within 0.3 s"]


@pytest.fixture
def bus_without_machined(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real dbus-daemon, on which no org.freedesktop.machine1 can be activated."""
    if shutil.which("dbus-daemon") is None:
        pytest.skip("dbus-daemon is not installed (apt: dbus)")
    address = f"unix:path={tmp_path}/bus"
    daemon = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--nopidfile", f"--address={address}"],
        stdout=subprocess.DEVNULL,
    )
    try:
        while not (tmp_path / "bus").exists():
            assert daemon.poll() is None, "dbus-daemon exited"
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
        yield address
    finally:
        daemon.terminate()
        daemon.wait()


@pytest.mark.usefixtures("as_service", "bus_without_machined")
async def test_bus_without_machined_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    """The bus answers that there is no machined: one warning in the bus's own words."""
    assert await machined.register("vm", Config()) is False
    (warning,) = warnings(caplog)
    assert warning.startswith(f"{NOT_REGISTERED}: "), warning
    assert warning.endswith("(org.freedesktop.DBus.Error.ServiceUnknown)"), warning
