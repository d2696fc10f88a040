"""Readiness on its own: the notify port's lines, the SSH probe, the first boot's bound, config."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from vmhost import config
from vmhost.errors import ConfigError
from vmhost.vm.readiness import MAX_LINE, MAX_STATUS, NOTIFY_PORT, Readiness, ssh_banner


class Seen:
    """What a Readiness told its controller."""

    def __init__(self) -> None:
        self.ready: list[str] = []
        self.not_ready: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []

    def readiness(self, ready: str = "notify", timeout: int = 60, ssh_port: int = 0) -> Readiness:
        boot = config.BootConfig(ready=ready, ready_timeout_seconds=timeout)  # type: ignore[arg-type]
        vm = config.Config(boot=boot, network=config.NetworkConfig(ssh_port=ssh_port))
        return Readiness(vm, self.spawn, self.ready.append, self.stopped, 10)

    async def stopped(self) -> None:
        """What the controller's graceful stop stands for."""
        self.not_ready.append("stopped")

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self.tasks.append(task)
        return task


async def feed(readiness: Readiness, data: bytes) -> None:
    reader = asyncio.StreamReader(limit=MAX_LINE)
    reader.feed_data(data)
    reader.feed_eof()
    await readiness.read_notify(reader)


async def test_ready_once_per_boot_and_status_kept() -> None:
    """READY=1 ends the wait once; STATUS= is kept, cut and made printable; a reset waits again."""
    seen = Seen()
    r = seen.readiness()
    r.begin(time.monotonic())
    assert r.waiting and "READY=1 on org.vmhost.notify.0" in r.status_text()
    status = "x" * 300 + "\x1b"
    await feed(r, f"STATUS=mounting\nSTATUS={status}\nREADY=1\nREADY=1\n".encode())
    assert len(seen.ready) == 1 and seen.ready[0].startswith("guest ready ")
    assert "after QEMU started (READY=1 on org.vmhost.notify.0)" in seen.ready[0]
    assert r.guest_status == "x" * MAX_STATUS and not r.waiting
    r.begin(time.monotonic())  # the guest was reset
    assert r.guest_status == "" and r.left() == 0.0  # only the first boot is bounded
    await feed(r, b"READY=1\n")
    assert "after its reset" in seen.ready[1]
    assert seen.not_ready == []


async def test_garbage_is_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    """Lines not KEY=VALUE, an overlong line and READY=0 change nothing; a few are logged."""
    seen = Seen()
    r = seen.readiness()
    r.begin(time.monotonic())
    long_ready = b"A" * (MAX_LINE + 10) + b"READY=1\n"
    junk = b"hello\n\xff\xfe=1\nready=1\nREADY=0\nREADY\n\n" + long_ready + b"x\n" * 10
    with caplog.at_level(logging.WARNING):
        await feed(r, junk)
    assert seen.ready == [] and r.waiting
    logged = [m for m in caplog.messages if m.startswith(NOTIFY_PORT)]
    assert len(logged) == 5, logged
    assert any(f"longer than {MAX_LINE} bytes" in m for m in logged)
    await feed(r, b"STATUS=ok\r\nREADY=1\n")  # what follows is read as before
    assert r.guest_status == "ok" and len(seen.ready) == 1


async def test_first_boot_is_bounded() -> None:
    """No READY=1 within ready_timeout_seconds: not ready, once; STATUS= says what and how long."""
    seen = Seen()
    r = seen.readiness(timeout=1)
    r.begin(time.monotonic())
    await feed(r, b"STATUS=still going\n")
    assert r.status_text().endswith("s left); guest: still going")
    await asyncio.sleep(1.2)
    assert r.failure == "not ready within ready_timeout_seconds (1 s)"
    assert seen.not_ready == ["stopped"]
    assert not r.waiting and seen.ready == []
    await feed(r, b"READY=1\n")  # too late: the controller is stopping the VM
    assert seen.ready == []


async def test_resets_during_the_first_boot_keep_its_bound() -> None:
    """A guest resetting before it was ever ready does not restart the first boot's clock."""
    seen = Seen()
    r = seen.readiness(timeout=2)
    started = time.monotonic()
    r.begin(started)
    await asyncio.sleep(1.2)
    r.begin(time.monotonic())  # the guest was reset
    assert r.left() < 1.0
    await asyncio.sleep(1.0)
    assert seen.not_ready and time.monotonic() - started < 2.5


async def test_ssh_probe_waits_for_a_banner() -> None:
    """The probe retries through refused and silent ports and is ready at the first SSH- line."""
    silent = True

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not silent:
            writer.write(b"SSH-2.0-test\r\n")
        await asyncio.sleep(0.1)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        assert not await ssh_banner(port, timeout=0.5)
        seen = Seen()
        r = seen.readiness(ready="ssh", ssh_port=port)
        r.begin(time.monotonic())
        await asyncio.sleep(0.5)
        assert seen.ready == []
        silent = False
        async with asyncio.timeout(5):
            while not seen.ready:
                await asyncio.sleep(0.05)
    assert f"(SSH banner on 127.0.0.1:{port})" in seen.ready[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[boot]\nready = "dbus"\n', 'boot.ready: expected one of "agent", "notify", "qemu"'),
        ("[boot]\nready_timeout_seconds = 0\n", "boot.ready_timeout_seconds: expected >= 1, got 0"),
        ('[boot]\nready = "agent"\n', 'boot.ready: "agent" needs a guest agent: set agent.port'),
        ('[boot]\nready = "ssh"\n', 'boot.ready: "ssh" needs an SSH forward: set network.ssh_port'),
    ],
)
def test_bad_ready_config_names_the_field(tmp_path: Path, text: str, message: str) -> None:
    """A wrong mode or timeout, or a mode the VM cannot have, names boot.ready(_timeout_seconds)."""
    (tmp_path / "disk.img").write_bytes(b"")
    path = tmp_path / "vm.toml"
    path.write_text('[[disks]]\npath = "disk.img"\n' + text)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert str(caught.value).startswith(f"{path}: {message}")


def test_ready_without_a_kernel_boots_from_disk(tmp_path: Path) -> None:
    """[boot] may hold only the ready settings: the VM boots from its first disk."""
    (tmp_path / "disk.img").write_bytes(b"")
    path = tmp_path / "vm.toml"
    path.write_text('[[disks]]\npath = "disk.img"\n[boot]\nready = "notify"\n')
    loaded = config.load(path)
    assert loaded.boot is not None and loaded.boot.ready == "notify"
    assert loaded.boot.kernel == "" and loaded.boot.ready_timeout_seconds == 300
