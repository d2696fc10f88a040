"""``vmhostctl list``: every config and control socket of the host, asked in parallel (issue 12 §2).

The directories are moved into the test's tmp dir with the variables the
commands document (``CONFIGURATION_DIRECTORY``, ``VMHOST_RUN_DIR``).  The
socket-activation side (a listening socket unit is not connected to) is
proven under systemd in test_systemd_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import VM, FakeController
from fixtures import Vmhost, wait_for

from vmhost import inventory
from vmhost.cli import vmhostctl_main
from vmhost.control.server import Server
from vmhost.vm import controller


def _socket_file(run_dir: Path, name: str, *, listening: bool) -> socket.socket:
    """A socket file for VM ``name``: listened on but never answered, or nobody's at all."""
    path = run_dir / name / "vmhost.sock"
    path.parent.mkdir()
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    if listening:
        sock.listen()
    else:
        sock.close()  # the file stays: a stale socket, connect is refused
    return sock


def _list(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[str, str, float]:
    started = time.monotonic()
    assert vmhostctl_main(["list", *argv]) == 0
    elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    return out, err, elapsed


async def test_list_asks_every_socket_at_once(
    host_dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Configs and sockets make the rows; two silent sockets cost one timeout, not two."""
    config_dir, run_dir = host_dirs
    for name in ("web", "down"):
        (config_dir / f"{name}.toml").write_text("")
    (config_dir / "..hidden.toml").write_text("")  # not a VM name: ignored
    fake = FakeController()
    fake.pid = os.getpid()  # a process that exists, so its uptime is known
    silent = [_socket_file(run_dir, name, listening=True) for name in ("silent1", "silent2")]
    _socket_file(run_dir, "stale", listening=False)
    (run_dir / "web").mkdir()
    try:
        async with Server(fake, run_dir / "web" / "vmhost.sock"):
            out, err, elapsed = await asyncio.to_thread(_list, "--json", capsys=capsys)
            human, _, _ = await asyncio.to_thread(_list, capsys=capsys)
    finally:
        for sock in silent:
            sock.close()

    rows = {row["name"]: row for row in json.loads(out)}
    assert list(rows) == ["down", "silent1", "silent2", "stale", "web"]
    web = rows.pop("web")
    assert (web["state"], web["pid"], web["ssh_port"]) == ("running", os.getpid(), 2222)
    assert 0 <= web["uptime_seconds"] < 3600
    assert rows["down"] == rows["stale"] | {"name": "down"}
    assert rows["stale"] == {
        "name": "stale",
        "state": "stopped",
        "pid": None,
        "ssh_port": None,
        "uptime_seconds": None,
        "error": None,
    }
    for name in ("silent1", "silent2"):
        assert rows[name]["state"] == "unresponsive"
        assert "timed out" in rows[name]["error"]
    assert inventory.ASK_TIMEOUT <= elapsed < 2 * inventory.ASK_TIMEOUT, elapsed
    assert err == ""

    lines = human.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "PID", "SSH", "UPTIME"]
    assert lines[1].split() == ["down", "stopped", "-", "-", "-"]
    assert lines[5].split()[:4] == ["web", "running", str(os.getpid()), "2222"]


def test_list_of_nothing(host_dirs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert _list("--json", capsys=capsys)[0] == "[]\n"
    assert _list(capsys=capsys)[0].split() == ["NAME", "STATE", "PID", "SSH", "UPTIME"]


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0, "0s"), (42, "42s"), (423, "7m03s"), (7500, "2h05m"), (273600, "3d04h")],
)
def test_duration(seconds: int, shown: str) -> None:
    assert inventory.duration(seconds) == shown


@pytest.mark.slow
def test_list_with_a_hung_qemu_and_a_hung_vmhost(
    host_dirs: tuple[Path, Path],
    make_vm: Callable[..., VM],
    vmhost_for: Callable[[VM], Vmhost],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A SIGSTOPped QEMU: its vmhost still answers (unresponsive, with pid, port, uptime);
    a SIGSTOPped vmhost: the row says unresponsive after the short timeout."""
    config_dir, run_dir = host_dirs
    vm = make_vm()
    (config_dir / "hung.toml").write_text(vm.config.read_text())
    vmhost = vmhost_for(vm)
    vmhost.socket = run_dir / "hung" / "vmhost.sock"
    qemu_pid = vmhost.start().wait_running().pid
    limit = controller.PROBE_INTERVAL + controller.PROBE_TIMEOUT + 5
    os.kill(qemu_pid, signal.SIGSTOP)
    try:
        wait_for(lambda: vmhost.status().vm_state == "unresponsive", limit, "unresponsive")
        out, _, elapsed = _list("--json", capsys=capsys)
        (row,) = json.loads(out)
        assert (row["name"], row["state"]) == ("hung", "unresponsive")
        assert (row["pid"], row["ssh_port"]) == (qemu_pid, vm.ssh_port)
        assert row["uptime_seconds"] >= 0
        assert elapsed < inventory.ASK_TIMEOUT

        vmhost.signal(signal.SIGSTOP)
        try:
            out, err, elapsed = _list(capsys=capsys)
        finally:
            vmhost.signal(signal.SIGCONT)
        assert out.splitlines()[1].split() == ["hung", "unresponsive", "-", "-", "-"]
        assert "timed out" in err
        assert inventory.ASK_TIMEOUT <= elapsed < 2 * inventory.ASK_TIMEOUT, elapsed
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(qemu_pid, signal.SIGCONT)
