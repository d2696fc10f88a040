"""The tiny test guest: its build cache, and its behaviour under a plain QEMU (no vmhost)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import guest.build as guest_build
import pytest
from guest.build import STAMP, GuestImage, build, fresh_disk
from qemu.qmp import QMPClient

BUILD_PY = Path(__file__).parent / "guest" / "build.py"
READY = "TINYGUEST READY"


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> GuestImage:
    return build(tmp_path_factory.mktemp("guest"))


def inodes(image: GuestImage) -> list[int]:
    return [os.stat(path).st_ino for path in (image.kernel, image.initrd, image.disk)]


def cli(outdir: Path, *flags: str) -> subprocess.Popen[str]:
    """The CLI under Debian's own Python, the only one inside a volatile nspawn container."""
    argv = ["/usr/bin/python3", str(BUILD_PY), str(outdir), *flags]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def test_build_output_and_cache_hit(image: GuestImage) -> None:
    """A second build of current packages rewrites nothing; the CLI reports the other flavour."""
    assert image.kernel.stat().st_size > 5_000_000
    assert image.initrd.read_bytes()[:2] == b"\x1f\x8b"
    assert image.disk.stat().st_size == 16 * 1024 * 1024
    assert image.disk.stat().st_blocks * 512 < 4 * 1024 * 1024  # sparse
    before = inodes(image)
    assert build(image.kernel.parent) == image
    assert inodes(image) == before
    proc = cli(image.kernel.parent, "--ignore-acpi")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert json.loads(out) == {
        "kernel": str(image.kernel),
        "initrd": str(image.kernel.parent / "initrd-noacpi.img"),
        "disk": str(image.disk),
    }
    assert inodes(image) == before


def test_fresh_disk_is_a_sparse_copy(image: GuestImage, tmp_path: Path) -> None:
    """Each test gets its own copy of the pristine disk, as sparse as the original."""
    disk = fresh_disk(image, tmp_path / "disk.img")
    assert disk.read_bytes() == image.disk.read_bytes()
    assert disk.stat().st_blocks <= image.disk.stat().st_blocks


@pytest.mark.slow  # a full rebuild, ~7 s
def test_stale_stamp_rebuilds(image: GuestImage) -> None:
    """A build recorded for another kernel version is replaced by a fresh one."""
    stamp = image.kernel.parent / STAMP
    current = json.loads(stamp.read_bytes())
    stamp.write_text(json.dumps({**current, "kernel": [current["kernel"][0], "0-old"]}))
    before = inodes(image)
    assert build(image.kernel.parent) == image
    assert all(b != a for b, a in zip(before, inodes(image), strict=True))
    assert json.loads(stamp.read_bytes()) == current


@pytest.mark.slow  # a full build from nothing
def test_concurrent_builder_waits_and_reuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A build started while the CLI is building into the same outdir waits and builds nothing."""
    proc = cli(tmp_path)
    deadline = time.monotonic() + 60
    while not any(tmp_path.glob(".build-*")):  # the CLI holds the lock from here on
        assert proc.poll() is None, "CLI ended before it started building"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    builds: list[object] = []
    real_build = guest_build._build

    def counting_build(*args: Any) -> None:
        builds.append(args)
        real_build(*args)

    monkeypatch.setattr(guest_build, "_build", counting_build)
    image = build(tmp_path)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert builds == []
    assert json.loads(out)["initrd"] == str(image.initrd)


class Vm:
    """The guest under a raw QEMU with QMP on an inherited socketpair, as vmhost runs it."""

    def __init__(self, proc: asyncio.subprocess.Process, qmp: QMPClient, console: Path) -> None:
        self.proc = proc
        self.qmp = qmp
        self.console = console
        self.ports: dict[int, int] = {}

    def text(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    async def wait_console(self, needle: str, timeout: float = 90) -> None:
        async with asyncio.timeout(timeout):
            while needle not in self.text():
                assert self.proc.returncode is None, f"QEMU exited:\n{self.text()}"
                await asyncio.sleep(0.05)

    async def exited(self, timeout: float) -> int:
        async with asyncio.timeout(timeout):
            return await self.proc.wait()

    async def shutdown_event(self) -> Any:
        async for event in self.qmp.events:
            if event["event"] == "SHUTDOWN":
                return event["data"]
        raise AssertionError("QMP closed without SHUTDOWN")


@asynccontextmanager
async def qemu(
    image: GuestImage, disk: Path, token: str, *extra: str, no_reboot: bool = True
) -> AsyncIterator[Vm]:
    parent, child = socket.socketpair()
    console = disk.with_suffix(".log")
    argv = [
        "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
        "-machine", "q35,accel=tcg", "-cpu", "max", "-m", "256", "-smp", "1",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", " ".join(["console=ttyS0 quiet panic=-1", f"guest.token={token}", *extra]),
        "-drive", f"file={disk},format=raw,if=virtio",
        "-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:0-:22,hostfwd=tcp:127.0.0.1:0-:1024",
        "-device", "virtio-net-pci,netdev=n0",
        "-serial", f"file:{console}",
        "-chardev", f"socket,id=mon0,fd={child.fileno()},server=off",
        "-mon", "chardev=mon0,mode=control",
        *(["-no-reboot"] if no_reboot else []),
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*argv, pass_fds=[child.fileno()])
    child.close()
    qmp = QMPClient("tinyguest")
    try:
        await qmp.connect(parent)
        vm = Vm(proc, qmp, console)
        # Host ports 0 let slirp pick free ones; only the monitor knows which.
        usernet = str(await qmp.execute("human-monitor-command", {"command-line": "info usernet"}))
        for host, guest in re.findall(r"HOST_FORWARD\]\s+\d+\s+\S+\s+(\d+)\s+\S+\s+(\d+)", usernet):
            vm.ports[int(guest)] = int(host)
        yield vm
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        with suppress(Exception):
            await qmp.disconnect()


def debugfs(disk: Path, request: str) -> str:
    done = subprocess.run(["debugfs", "-R", request, str(disk)], capture_output=True, check=True)
    return done.stdout.decode()


def assert_clean(disk: Path) -> None:
    header = subprocess.run(["dumpe2fs", "-h", str(disk)], capture_output=True, check=True)
    assert "needs_recovery" not in header.stdout.decode()
    assert re.search(r"Filesystem state:\s+clean\n", header.stdout.decode())


class Agent:
    """Host side of the stereosd wire: one JSON line out, one JSON line back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def call(self, type_: str, **payload: Any) -> Any:
        request = {"type": type_, "payload": payload} if payload else {"type": type_}
        self.writer.write(json.dumps(request, ensure_ascii=False).encode() + b"\n")
        async with asyncio.timeout(30):
            return json.loads(await self.reader.readline())


def ack(type_: str) -> dict[str, Any]:
    return {"type": "ack", "payload": {"reply_to": type_, "ok": True}}


@pytest.mark.slow
async def test_ssh_banner_and_agent_session(image: GuestImage, tmp_path: Path) -> None:
    """hostfwd reaches port 22; the agent carries out each request and powers off on shutdown."""
    disk = fresh_disk(image, tmp_path / "disk.img")
    config = 'name = "démo"\n[vm]\nnote = "tab\\there"\n'
    async with qemu(image, disk, "agent-tok") as vm:
        await vm.wait_console(READY)
        reader, writer = await asyncio.open_connection("127.0.0.1", vm.ports[22])
        async with asyncio.timeout(10):
            assert await reader.readline() == b"SSH-2.0-tinyguest\n"
        writer.close()

        agent = Agent(*await asyncio.open_connection("127.0.0.1", vm.ports[1024]))
        assert await agent.call("ping") == {"type": "pong"}
        health = await agent.call("get_health")
        assert health["payload"]["state"] == "ready"
        assert health["payload"]["agents"] == []
        assert isinstance(health["payload"]["uptime_seconds"], int)
        assert await agent.call("set_config", content=config) == ack("set_config")
        key = "ssh-ed25519 AAAAC3Nz test@host"
        assert await agent.call("inject_ssh_key", user="admin", public_key=key) == ack(
            "inject_ssh_key"
        )
        secret = await agent.call("inject_secret", name="db.pw", value='s3"cr', mode=0o600)
        assert secret == ack("inject_secret")
        assert await agent.call(
            "mount", tag="share0", guest_path="/data", fs_type="9p", read_only=True
        ) == ack("mount")
        bad = await agent.call("inject_secret", name="../escape", value="x", mode=0o600)
        assert bad["payload"]["ok"] is False
        assert await agent.call("shutdown", reason="test") == ack("shutdown")
        assert (await vm.shutdown_event())["reason"] == "guest-shutdown"
        assert await vm.exited(30) == 0

    assert debugfs(disk, "cat /marker") == "agent-tok\n"
    assert debugfs(disk, "cat /agent/config.toml") == config
    assert debugfs(disk, "cat /agent/ssh/admin/authorized_keys") == key + "\n"
    assert debugfs(disk, "cat /agent/secrets/db.pw") == 's3"cr'
    assert re.search(r"Mode:\s+0600", debugfs(disk, "stat /agent/secrets/db.pw"))
    assert debugfs(disk, "cat /agent/mounts") == "share0 /data 9p true\n"
    assert_clean(disk)


@pytest.mark.slow
async def test_powerdown_right_after_ready(image: GuestImage, tmp_path: Path) -> None:
    """system_powerdown sent the moment READY shows is honoured: clean exit, marker intact."""
    disk = fresh_disk(image, tmp_path / "disk.img")
    async with qemu(image, disk, "acpi-tok") as vm:
        await vm.wait_console(READY)
        await vm.qmp.execute("system_powerdown")
        assert (await vm.shutdown_event())["reason"] == "guest-shutdown"
        assert await vm.exited(30) == 0
    assert debugfs(disk, "cat /marker") == "acpi-tok\n"
    assert_clean(disk)


@pytest.mark.slow
async def test_ignore_acpi_guest_keeps_running(image: GuestImage, tmp_path: Path) -> None:
    """The --ignore-acpi flavour shrugs off system_powerdown."""
    deaf = build(image.kernel.parent, ignore_acpi=True)
    disk = fresh_disk(deaf, tmp_path / "disk.img")
    async with qemu(deaf, disk, "deaf-tok") as vm:
        await vm.wait_console(READY)
        await vm.qmp.execute("system_powerdown")
        await asyncio.sleep(3)
        assert vm.proc.returncode is None
    assert debugfs(disk, "cat /marker") == "deaf-tok\n"


@pytest.mark.slow
async def test_reboot_once_then_autopoweroff(image: GuestImage, tmp_path: Path) -> None:
    """One guest reboot keeps QEMU alive; after READY the guest powers itself off on time."""
    disk = fresh_disk(image, tmp_path / "disk.img")
    extra = ("guest.reboot_once=1", "guest.autopoweroff=1", "guest.autopoweroff_delay=2")
    async with qemu(image, disk, "boot-tok", *extra, no_reboot=False) as vm:
        await vm.wait_console(READY)
        ready_at = time.monotonic()
        assert await vm.exited(120) == 0
        assert time.monotonic() - ready_at > 1.0
    console = vm.text()
    assert console.count("TINYGUEST REBOOTING") == 1
    assert console.count(READY) == 1
    assert console.index("TINYGUEST REBOOTING") < console.index(READY)
    assert debugfs(disk, "cat /marker") == "boot-tok\nboot-tok\n"
    assert "rebooted" in debugfs(disk, "ls /")
    assert_clean(disk)
