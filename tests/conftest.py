"""Shared fixtures: a stand-in controller for server-layer tests, a live server on a socket."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Final, NoReturn

import pytest
from guest.build import GuestImage, build, fresh_disk
from qemu.qmp import QMPClient

from vmhost.config import Config
from vmhost.control.connection import Limits
from vmhost.control.server import Server
from vmhost.vm import argv as qemu_argv
from vmhost.vm.state import Change, Changes, VMState

if TYPE_CHECKING:
    from fixtures import Vmhost


def pytest_addoption(parser: pytest.Parser) -> None:
    soak = parser.getgroup("soak", "the fault soak (tests/test_soak.py)")
    soak.addoption("--soak-vms", type=int, default=4, help="VMs of the long soak (-m soak)")
    soak.addoption("--soak-minutes", type=float, default=30, help="minutes of the long soak")
    soak.addoption("--soak-seed", type=int, default=None, help="replay this seed (default: new)")
    scale = parser.getgroup("scale", "many VMs at once (tests/test_scale.py)")
    scale.addoption("--scale-vms", type=int, default=4, help="VMs started at once (issue: 20)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Soak batteries run only when asked for by name (`-m soak`), whatever else -m says."""
    if "soak" in (config.option.markexpr or ""):
        return
    soak = [item for item in items if item.get_closest_marker("soak")]
    if soak:
        config.hook.pytest_deselected(items=soak)
        items[:] = [item for item in items if not item.get_closest_marker("soak")]


STRICT_ENV: Final = "VMHOST_TEST_STRICT"
"""Set by scripts/test (so CI): a missing prerequisite fails the run instead of skipping."""


def prerequisite_missing(reason: str) -> NoReturn:
    """Skip for a developer's quick run; fail under ``$VMHOST_TEST_STRICT`` (scripts/test), where
    a test that cannot run must not pass as if it had proven something."""
    if os.environ.get(STRICT_ENV):
        pytest.fail(f"prerequisite missing (${STRICT_ENV} is set): {reason}", pytrace=False)
    pytest.skip(reason)


class FakeController:
    """A controller whose VM is a flag; for tests of the server layer only.

    It keeps QemuController's contract: a stop takes effect on the call (a
    ``status`` right after the answer says ``stopping``), and the awaitable it
    returns resolves once the VM is gone (:meth:`end`, or at once for force_stop).
    """

    backend = "qemu"
    ssh_port = 2222
    pid = 4242
    step = ""
    max_timeout = 600
    timeout_seconds = 20
    """The config's ``[stop] timeout_seconds``: what a stop that names none gets."""

    def __init__(self) -> None:
        self.state = VMState.RUNNING
        self.stops: list[float | None] = []
        self.force_stops = 0
        self.migrations: list[str] = []
        self._ended = asyncio.Event()
        self.changes = Changes()
        self.changes.publish(Change(self.state))

    @property
    def stop_timeout(self) -> float:
        if not self.stops:
            return 0.0
        return min(self.stops[0] or self.timeout_seconds, self.max_timeout)

    def stop(self, timeout: float | None = None) -> Awaitable[None]:
        self.stops.append(timeout)
        if not self.state.ended:
            self.state = VMState.STOPPING
        return self.wait()

    def force_stop(self) -> Awaitable[None]:
        self.force_stops += 1
        self.end()
        return self.wait()

    def migrate(self, uri: str) -> str:
        if self.state is not VMState.RUNNING:
            return f"the VM is {self.state.value}"
        self.migrations.append(uri)
        self.state = VMState.MIGRATING
        return ""

    def end(self, state: VMState = VMState.STOPPED) -> None:
        """The VM is gone: stops resolve, ``wait`` returns."""
        self.state = state
        self._ended.set()

    async def wait(self) -> None:
        await self._ended.wait()


@pytest.fixture
def host_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """The host's config and socket directories, moved into tmp_path for vmhost and vmhostctl."""
    config_dir, run_dir = tmp_path / "etc", tmp_path / "run"
    config_dir.mkdir()
    run_dir.mkdir()
    monkeypatch.setenv("CONFIGURATION_DIRECTORY", str(config_dir))
    monkeypatch.setenv("VMHOST_RUN_DIR", str(run_dir))
    return config_dir, run_dir


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "vmhost.sock"


@pytest.fixture
def controller() -> FakeController:
    return FakeController()


@pytest.fixture
async def server(sock_path: Path, controller: FakeController) -> AsyncIterator[Server]:
    limits = Limits(request_timeout=1.0, max_connections=300)
    async with Server(controller, sock_path, limits=limits) as srv:
        yield srv


# -- a real VM: the tiny guest under QEMU -------------------------------------

CACHE = Path(os.environ.get("VMHOST_TEST_CACHE", "/var/tmp/vmhost-test-cache"))


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now and not handed out before in this run.

    The kernel may give the same ephemeral port to two binds in a row once the
    first is closed, and one VM takes several ports before any is bound.
    """
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@pytest.fixture(scope="session")
def guest() -> GuestImage:
    """The tiny guest, built once per package versions into the one cache every test uses."""
    return build(CACHE / "guest")


@pytest.fixture(scope="session")
def deaf_guest(guest: GuestImage) -> GuestImage:
    """A guest that ignores the ACPI power button (built alongside ``guest``)."""
    return build(guest.kernel.parent, ignore_acpi=True)


@dataclasses.dataclass
class BareQemu:
    """QEMU from ``qemu_argv.argv()`` alone, no controller: for tests of the command line and the
    agent client.  ``stderr`` and ``console`` are filled in once the context has ended."""

    proc: asyncio.subprocess.Process
    qmp: QMPClient
    stderr: bytes = b""
    console: bytes = b""


@contextlib.asynccontextmanager
async def bare_qemu(
    config: Config, name: str, *, agent_socket: Path | None = None
) -> AsyncIterator[BareQemu]:
    """Run QEMU with QMP connected and the serial console drained (so the guest never blocks);
    the guest agent, if any, behind ``agent_socket``."""
    qmp_parent, qmp_child = socket.socketpair()
    console_read, console_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    args = qemu_argv.argv(
        config, name=name, qmp_fd=qmp_child.fileno(), console_fd=console_write, kvm=False
    )
    proc = await asyncio.create_subprocess_exec(
        *args,
        pass_fds=[qmp_child.fileno(), console_write],
        env=qemu_argv.environment(os.environ, agent_socket=agent_socket),
        stderr=subprocess.PIPE,
    )
    qmp_child.close()
    os.close(console_write)
    loop = asyncio.get_running_loop()
    console_reader = asyncio.StreamReader()
    console_transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(console_reader), os.fdopen(console_read, "rb", 0)
    )
    console = asyncio.create_task(console_reader.read())
    bare = BareQemu(proc, QMPClient(name))
    try:
        async with asyncio.timeout(30):
            await bare.qmp.connect(qmp_parent)
        yield bare
    finally:
        with contextlib.suppress(EOFError):  # raised when QEMU has gone first
            await bare.qmp.disconnect()
        if proc.returncode is None:
            proc.kill()
        _, bare.stderr = await proc.communicate()
        bare.console = await console  # QEMU's end: its exit ends the read
        console_transport.close()
        qmp_parent.close()


@dataclasses.dataclass
class VM:
    """One VM's files: its config, disk, state dir and socket, in a test's tmp dir."""

    dir: Path
    config: Path
    disk: Path
    token: str
    ssh_port: int

    @property
    def socket(self) -> Path:
        return self.dir / "vmhost.sock"

    @property
    def console(self) -> Path:
        return self.dir / "console.log"

    def marker(self, path: str = "/marker") -> str:
        """A file the guest wrote (its marker by default), read from the disk image."""
        out = subprocess.run(
            ["debugfs", "-R", f"cat {path}", str(self.disk)],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout.strip()

    def clean(self) -> bool:
        """The ext4 image was unmounted cleanly (no journal recovery pending)."""
        out = subprocess.run(
            ["dumpe2fs", "-h", str(self.disk)], capture_output=True, text=True, check=True
        )
        return "needs_recovery" not in out.stdout

    def serve(self, *extra: str) -> subprocess.Popen[bytes]:
        """``vmhost serve`` for this VM as a child process."""
        return subprocess.Popen(
            [sys.executable, "-m", "vmhost", "serve", "t", *self.args(), *extra],
            stderr=subprocess.PIPE,
        )

    def args(self) -> list[str]:
        return [
            "--config",
            str(self.config),
            "--socket",
            str(self.socket),
            "--state-dir",
            str(self.dir),
        ]

    async def wait_for_console(self, text: str, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while not (self.console.exists() and text in self.console.read_text(errors="replace")):
                await asyncio.sleep(0.1)


@pytest.fixture
def make_vm(tmp_path: Path, guest: GuestImage) -> Callable[..., VM]:
    """Writes a VM's config; keyword arguments change the guest, add to [boot] or append TOML."""

    def make(
        *,
        image: GuestImage | None = None,
        cmdline: str = "",
        toml: str = "",
        timeout: int = 10,
        boot: str = "",
    ) -> VM:
        image = image or guest
        vm_dir = tmp_path / f"vm{len(list(tmp_path.glob('vm*')))}"
        vm_dir.mkdir()
        disk = fresh_disk(image, vm_dir / "disk.img")
        token = vm_dir.name + "-" + os.urandom(4).hex()
        port = free_port()
        config = vm_dir / "vm.toml"
        config.write_text(
            f"""
[machine]
accel = "tcg"
[boot]
kernel = "{image.kernel}"
initrd = "{image.initrd}"
cmdline = "console=ttyS0 quiet panic=-1 guest.token={token} {cmdline}"
{boot}
[[disks]]
path = "{disk}"
[network]
ssh_port = {port}
[stop]
timeout_seconds = {timeout}
{toml}
"""
        )
        config.chmod(0o600)  # private, as inline [agent] secrets require
        return VM(vm_dir, config, disk, token, port)

    return make


@pytest.fixture
def vmhost_for() -> Iterator[Callable[[VM], Vmhost]]:
    """Runs ``vmhost serve`` for a VM (tests/fixtures.py); kills what a test left running."""
    from fixtures import vmhost_factory  # fixtures imports this module: not at the top

    yield from vmhost_factory()
