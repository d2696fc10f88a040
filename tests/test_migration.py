"""Live migration between two ``vmhost serve`` processes on this host, with the real guest.

The two ends share the disk and differ in what is host-local: the SSH forward's port, the
state directory, the control socket.  The target is asked to receive as ``vmhostctl
receive`` asks it (the request file in its state directory), and the source is driven
through its control socket, as ``vmhostctl migrate --uri`` drives it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import VM, free_port
from fixtures import ENV, Vmhost, qemu_alive, wait_for

from vmhost import marks
from vmhost.client import Client
from vmhost.errors import ServerError
from vmhost.service import EXIT_INCOMING_FAILED, EXIT_MIGRATED, EXIT_OK
from vmhost.vm.agent import Agent

pytestmark = pytest.mark.slow

MakeVM = Callable[..., VM]
VmhostFor = Callable[[VM], Vmhost]
SLOW = "max_bandwidth_mib = 1"
"""A stream slow enough (1 MiB/s for ~20 MiB of the guest's used memory) to act during it."""
TARGET_ADDRESS = "127.0.0.2"
"""The target's SSH forward binds the source's port on this address ([network] ssh_address)."""


def pair(make_vm: MakeVM, vmhost_for: VmhostFor, migration: str = "") -> tuple[Vmhost, Vmhost]:
    """A booted source, and a target listening for its guest."""
    port = free_port()
    section = f'[migration]\nlisten_address = "127.0.0.1"\nport = {port}\n{migration}\n'
    source_vm = make_vm(toml=f"[agent]\nport = {free_port()}\n{section}")
    source = vmhost_for(source_vm)
    source.boot()
    target_dir = source_vm.dir.with_name(source_vm.dir.name + "-target")
    target_dir.mkdir()
    # The same forward's port on another address of this host, as on another host.
    text = source_vm.config.read_text().replace(
        f"ssh_port = {source_vm.ssh_port}",
        f'ssh_port = {source_vm.ssh_port}\nssh_address = "{TARGET_ADDRESS}"',
    )
    config = target_dir / "vm.toml"
    config.write_text(text)
    config.chmod(0o600)
    target_vm = dataclasses.replace(source_vm, dir=target_dir, config=config)
    marks.request_incoming(target_dir)
    target = vmhost_for(target_vm).start()
    wait_for(lambda: _vm_state(target) == "incoming", 60, "the target waiting for the guest")
    return source, target


def uri(target: Vmhost) -> str:
    port = target.vm.config.read_text().partition("[migration]")[2].split("port = ")[1]
    return f"tcp:127.0.0.1:{int(port.split()[0])}"


def _vm_state(vmhost: Vmhost) -> str:
    try:
        return vmhost.status().vm_state
    except Exception:
        return ""


def guest_uptime(vm: VM) -> float:
    """The guest's own uptime, from its agent."""

    async def ask() -> float:
        loop = asyncio.get_running_loop()
        agent = await Agent.connect(str(vm.dir / "agent.sock"), deadline=loop.time() + 30)
        try:
            return (await agent.get_health()).uptime_seconds
        finally:
            agent.close()

    return asyncio.run(ask())


def test_the_guest_moves_without_rebooting(make_vm: MakeVM, vmhost_for: VmhostFor) -> None:
    """The guest runs on at the target: one boot on its disk, uptime counting, source exits 9."""
    source, target = pair(make_vm, vmhost_for)
    time.sleep(2)
    before = guest_uptime(source.vm)
    with socket.create_connection(("127.0.0.1", source.vm.ssh_port), timeout=10) as session:
        assert session.recv(64).startswith(b"SSH-2.0-tinyguest")
        changes = Client(source.socket).watch()
        next(changes)
        answer = Client(source.socket, detail=True).migrate(uri(target))
        assert answer.vm_state == "migrating"
        seen = [change for change in changes]
        assert source.wait(30) == EXIT_MIGRATED
    assert seen[-1].vm_state == "migrated", seen
    assert any(" ms" in c.message for c in seen if c.event == "migration"), seen  # downtime
    assert "migrated: migrated to another host (downtime" in source.output()
    assert marks.migrated(source.vm.dir) == uri(target)
    wait_for(lambda: target.status().vm_state == "running", 30, "the guest running at the target")
    status = target.status()
    assert status.pid and qemu_alive(status.pid)
    assert guest_uptime(target.vm) >= before
    assert "TINYGUEST READY" not in target.vm.console.read_text(errors="replace")
    with socket.create_connection((TARGET_ADDRESS, target.vm.ssh_port), timeout=10) as session:
        assert session.recv(64).startswith(b"SSH-2.0-tinyguest")  # the forward moved too
    wait_for(lambda: "guest agent reconnected" in target.output(), 30, "the agent reconnected")
    assert "connected and provisioned" not in target.output()  # not provisioned again
    Client(target.socket).stop()
    assert target.wait(60) == EXIT_OK
    assert "stop: guest agent shutdown" in target.output()
    assert source.vm.clean()
    assert source.vm.marker().splitlines() == [source.vm.token]  # one boot, one line


def test_a_target_killed_mid_migration_leaves_the_guest_running_here(
    make_vm: MakeVM, vmhost_for: VmhostFor
) -> None:
    """The target dies during the stream: the source's guest runs on, and still stops cleanly."""
    source, target = pair(make_vm, vmhost_for, SLOW)
    target_qemu = target.status().pid
    changes = Client(source.socket).watch()
    next(changes)
    Client(source.socket).migrate(uri(target))
    progress = next(c for c in changes if "of RAM sent" in c.message)  # the stream flows
    assert progress.event == "migration" and progress.vm_state == "migrating"
    target.signal(signal.SIGKILL)
    target.wait(10)
    os.kill(target_qemu, signal.SIGKILL)  # it goes with its vmhost, as under KillMode=mixed
    wait_for(lambda: source.status().vm_state == "running", 30, "the source running again")
    assert "migration failed" in source.output()
    assert guest_uptime(source.vm) > 0  # the guest answers
    Client(source.socket).stop()
    assert source.wait(60) == EXIT_OK
    assert source.vm.clean()


def test_a_stop_during_a_migration_is_refused_and_sigterm_cancels_it(
    make_vm: MakeVM, vmhost_for: VmhostFor
) -> None:
    """A client's stop is refused while migrating; SIGTERM cancels it and stops the guest here."""
    source, target = pair(make_vm, vmhost_for, SLOW)
    Client(source.socket).migrate(uri(target))
    with pytest.raises(ServerError, match="migrating"):
        Client(source.socket).stop()
    source.signal(signal.SIGTERM)
    assert source.wait(60) == EXIT_OK
    assert source.vm.clean()
    assert marks.migrated(source.vm.dir) is None
    assert target.wait(60) == EXIT_INCOMING_FAILED
    assert "the incoming migration failed" in target.output()


def test_a_migration_past_its_timeout_is_cancelled(make_vm: MakeVM, vmhost_for: VmhostFor) -> None:
    """Past its timeout the source cancels: the guest runs on, the target exits 10."""
    source, target = pair(make_vm, vmhost_for, f"{SLOW}\ntimeout_seconds = 2")
    Client(source.socket).migrate(uri(target))
    wait_for(lambda: source.status().vm_state == "running", 30, "the source running again")
    assert "not done in 2 s: cancelled" in source.output()
    assert target.wait(30) == EXIT_INCOMING_FAILED
    assert guest_uptime(source.vm) > 0


def test_a_target_nobody_sends_to_gives_up(make_vm: MakeVM, vmhost_for: VmhostFor) -> None:
    """No guest within the timeout: the target exits 10 and leaves nothing running."""
    _, target = pair(make_vm, vmhost_for, "timeout_seconds = 2")
    qemu = target.status().pid
    assert target.wait(30) == EXIT_INCOMING_FAILED
    assert "no guest arrived within 2 s" in target.output()
    assert not qemu_alive(qemu)


def x509(directory: Path) -> Path:
    """A CA, and the target's (IP 127.0.0.1) and the source's certificates it signed, named
    as QEMU's tls-creds-x509 reads them."""
    directory.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=ca",
            "-keyout", "ca-key.pem", "-out", "ca-cert.pem")  # fmt: skip
    for end in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={end}",
                "-keyout", f"{end}-key.pem", "-out", f"{end}.csr")  # fmt: skip
        (directory / "ext.cnf").write_text(
            f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={end}Auth\n"
        )
        signed = ("-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial", "-days", "1")
        openssl("x509", "-req", "-in", f"{end}.csr", *signed, "-extfile", "ext.cnf",
                "-out", f"{end}-cert.pem")  # fmt: skip
    return directory


def test_the_stream_can_be_tls(make_vm: MakeVM, vmhost_for: VmhostFor, tmp_path: Path) -> None:
    """With QEMU's x509 credentials named in [migration], vmhostctl migrate moves it over TLS."""
    pki = x509(tmp_path / "pki")
    tls = (
        'tls_server_creds = "migs"\ntls_client_creds = "migc"\n[qemu]\nextra_args = ['
        f'"-object", "tls-creds-x509,id=migs,dir={pki},endpoint=server,verify-peer=on", '
        f'"-object", "tls-creds-x509,id=migc,dir={pki},endpoint=client"]\n'
    )
    source, target = pair(make_vm, vmhost_for, tls)
    ctl = "from vmhost.cli import vmhostctl_main; raise SystemExit(vmhostctl_main())"
    argv = ["--socket", str(source.socket), "migrate", "--uri", uri(target)]
    done = subprocess.run([sys.executable, "-c", ctl, *argv], env=ENV, capture_output=True)
    assert done.returncode == 0, done
    assert b"migrated: " in done.stdout and b" ms" in done.stdout  # vmhostctl's last line
    assert source.wait(60) == EXIT_MIGRATED
    wait_for(lambda: _vm_state(target) == "running", 30, "the guest running at the target")
    assert guest_uptime(target.vm) > 0
