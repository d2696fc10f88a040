"""A real ``vmhost serve`` process around a conftest ``VM``, for the fault and abuse batteries.

The process is driven from outside, as systemd or an operator would: by its
control socket, by signals, and by what it leaves behind (exit code, log,
console.log, the guest's disk).  Its output goes to a file, not a pipe, so a
long run never blocks on a full pipe; it runs in its own session, so a signal
to its process group reaches it (and its QEMU) only.  Teardown kills what a
test left running, QEMU included.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final, TypeVar

from conftest import VM

from vmhost.client import Client
from vmhost.control.wire import Response
from vmhost.errors import ClientError

REPO: Final = Path(__file__).resolve().parent.parent
ENV: Final = {**os.environ, "PYTHONPATH": str(REPO)}
"""For a child Python that runs vmhost from this tree, wherever pytest was started."""
SYSTEMD_NOFILE: Final = 1024
BOOT_TIMEOUT: Final = 60.0
"""TCG boots in ~2 s alone; other QEMUs on the two cores stretch it several times."""
NAME: Final = "battery"
T = TypeVar("T")


class Vmhost:
    """One ``vmhost serve`` subprocess for ``vm``."""

    def __init__(self, vm: VM, log: Path | None = None) -> None:
        self.vm = vm
        self.log = log or vm.dir / "vmhost.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.socket = vm.socket
        """Where to serve; the VM's own path unless a test moves it."""
        self.qemu_pids: set[int] = set()
        self.env = ENV
        self._console_from = 0

    def start(self, *extra: str) -> Vmhost:
        """Start serving; console waits look only at what this run writes."""
        console = self.vm.console
        self._console_from = console.stat().st_size if console.exists() else 0
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "vmhost", "serve", NAME, *self.vm.args()),
                    *("--socket", str(self.socket), *extra),  # the last --socket wins
                ],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=_as_under_systemd,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self, timeout: float = 2.0) -> Response:
        response = Client(self.socket, detail=True, dial_timeout=timeout, deadline=timeout).status()
        if response.pid:
            self.qemu_pids.add(response.pid)
        return response

    def wait_running(self, timeout: float = BOOT_TIMEOUT) -> Response:
        """Until the server answers and QEMU runs; returns that status."""
        return wait_for(self._running, timeout, "vmhost serving a running QEMU")

    def _running(self) -> Response | None:
        self._check_alive()
        try:
            response = self.status()
        except ClientError:  # not listening yet
            return None
        return response if response.vm_state == "running" else None

    def wait_console(self, text: str, timeout: float = BOOT_TIMEOUT) -> None:
        def seen() -> bool:
            self._check_alive()
            try:
                with self.vm.console.open("rb") as console:
                    console.seek(self._console_from)
                    return text.encode() in console.read()
            except FileNotFoundError:
                return False

        wait_for(seen, timeout, f"{text!r} on the console")

    def boot(self) -> Response:
        """Start, and return the status once the guest printed READY."""
        self.start()
        self.wait_running()
        self.wait_console("TINYGUEST READY")
        return self.status()

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"vmhost exited {self.proc.returncode}:\n{self.output()}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """vmhost's exit code; one still running after ``timeout`` fails the test with its log."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"vmhost still running {timeout:g} s later:\n{self.output()}"
            ) from None

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        """Teardown: vmhost and every QEMU it reported, if still there."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.qemu_pids:
            if qemu_alive(pid):
                os.kill(pid, signal.SIGKILL)


def _as_under_systemd() -> None:
    """The descriptor limit a service gets from systemd (DefaultLimitNOFILE=1024:524288)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(SYSTEMD_NOFILE, hard), hard))


def qemu_alive(pid: int) -> bool:
    """Whether ``pid`` is still a battery QEMU, not a zombie (the comm guards against reuse)."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return comm == f"vmhost-{NAME}"[:15] and state != "Z"


def vmhost_factory() -> Iterator[Callable[[VM], Vmhost]]:
    """Body of a ``vmhost_for`` fixture: makes Vmhosts, kills what they left running."""
    made: list[Vmhost] = []

    def make(vm: VM) -> Vmhost:
        made.append(Vmhost(vm))
        return made[-1]

    yield make
    for vmhost in made:
        vmhost.kill()


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll ``predicate`` until it returns something truthy, which is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)
