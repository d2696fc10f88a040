"""The QEMU process: spawn it, watch it through a pidfd (no PID-reuse race, no polling),
reap it, read its stderr, and say how it exited."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import enum
import logging
import os
import signal
import socket
import subprocess
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import IO, Any, Final

from ..config import Config
from ..errors import ControllerError
from . import argv
from .console import ConsoleInput
from .state import VMState

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG: Final = 1


class ExitCause(enum.Enum):
    """Why QEMU ended; decides the final state and the service's exit code."""

    POWEROFF = "guest powered off"
    REQUESTED = "stop requested"
    CRASHED = "QEMU crashed"
    KILLED = "QEMU killed from outside"
    START_FAILED = "QEMU failed to start"
    NOT_READY = "guest not ready"
    MIGRATED = "migrated to another host"
    INCOMING_FAILED = "the incoming migration failed"

    @property
    def state(self) -> VMState:
        return _FINAL[self]


_FINAL: Final = {
    ExitCause.POWEROFF: VMState.STOPPED,
    ExitCause.REQUESTED: VMState.STOPPED,
    ExitCause.CRASHED: VMState.CRASHED,
    ExitCause.KILLED: VMState.CRASHED,
    ExitCause.START_FAILED: VMState.ERROR,
    ExitCause.NOT_READY: VMState.ERROR,
    ExitCause.MIGRATED: VMState.MIGRATED,
    ExitCause.INCOMING_FAILED: VMState.ERROR,
}


def classify(
    code: int,
    state: VMState,
    signalled: bool,
    shutdown: Mapping[str, Any] | None,
    not_ready: str = "",
) -> tuple[ExitCause, str]:
    """How QEMU ended, from its exit code, the state it left, its last SHUTDOWN event and
    why its guest was stopped for not getting ready (``[boot] ready``), if it was."""
    shutdown = shutdown or {}
    how = f" by {signal_name(-code)}" if code < 0 else f", exit status {code}"
    if state is VMState.STARTING and (code >= 0 or signalled):
        return ExitCause.START_FAILED, how
    if state is VMState.INCOMING:  # QEMU gives up itself when the stream breaks
        return ExitCause.INCOMING_FAILED, how
    if state is VMState.STOPPING and not_ready:
        return ExitCause.NOT_READY, f": {not_ready}"
    if state is VMState.STOPPING:
        return ExitCause.REQUESTED, how if code else ""
    if code == 0 and shutdown.get("guest"):
        return ExitCause.POWEROFF, ""
    if code < 0 or shutdown.get("reason") in ("host-signal", "host-qmp-quit"):
        return ExitCause.KILLED, how
    return ExitCause.CRASHED, how


def signal_name(number: int) -> str:
    """``SIGTERM``, or ``signal 35`` for a number Python has no name for (real-time ones)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class QemuProcess:
    """One QEMU child: its pid, its pidfd while it lives, its stderr's last lines."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self.on_exit = on_exit
        """Called once with the exit code (``-N`` for signal N) when QEMU is reaped."""
        self.pid = 0
        self.signalled = False
        """vmhost sent it a signal: a start that ends by it is vmhost's doing, not a kill."""
        self.stderr_tail: deque[str] = deque(maxlen=5)
        self.stderr_closed = asyncio.Event()
        self.stderr: IO[bytes] | None = None
        self.stream: tuple[asyncio.ReadTransport, asyncio.StreamReader] | None = None
        """stderr as read through a transport: paused at a handover."""
        self.console_input = ConsoleInput()
        self._pidfd = -1
        self._popen: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        """When QEMU was exec'd (monotonic): where the guest's boot time counts from."""

    @property
    def reaped(self) -> bool:
        return self.pid != 0 and self._pidfd < 0

    def launch(
        self,
        config: Config,
        name: str,
        env: dict[str, str],
        notify: socket.socket | None = None,
        *,
        incoming: bool = False,
    ) -> tuple[socket.socket, IO[bytes]]:
        """QEMU for ``config``, held before the guest's first instruction (``-S``); returns
        vmhost's end of QMP and the console pipe's read end (the input's write end is
        :attr:`console_input`).  ``notify``, QEMU's end of the guest's notify port, is passed
        and closed.  Leaks nothing if it fails."""
        qmp_parent, qmp_child = socket.socketpair()
        console_read, console_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        input_read = self.console_input.open(console_write)
        try:
            args = argv.argv(
                config,
                name=name,
                qmp_fd=qmp_child.fileno(),
                console_fd=console_write,
                kvm=argv.accel_is_kvm(config),
                held=not incoming,  # an incoming guest runs as it ran on the source
                incoming=incoming,
                console_input_fd=input_read,
                notify_fd=notify.fileno() if notify is not None else None,
            )
            log.info("starting QEMU: %s", " ".join(args), extra={"VMHOST_STATE": "starting"})
            fds = (qmp_child.fileno(), console_write, input_read)
            self._spawn(args, env, (*fds, notify.fileno()) if notify is not None else fds)
        except BaseException:
            qmp_parent.close()
            os.close(console_read)
            self.console_input.close()
            raise
        finally:
            qmp_child.close()
            os.close(console_write)
            os.close(input_read)
            if notify is not None:
                notify.close()
        return qmp_parent, os.fdopen(console_read, "rb", buffering=0)

    def _spawn(self, args: list[str], env: dict[str, str], pass_fds: tuple[int, ...]) -> None:
        # Popen, not asyncio's: we watch the child through a pidfd, and fork+exec is quick.
        self.started = time.monotonic()
        self._popen = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=pass_fds,
            env=env,
            preexec_fn=_die_with_parent,
            # Its own process group: Ctrl-C on a foreground `vmhost serve` must reach
            # vmhost only (QEMU quits on SIGINT without asking the guest: a dirty disk).
            process_group=0,
        )
        assert self._popen.stderr is not None
        self._watch(self._popen.pid, self._popen.stderr)

    def adopt(self, pid: int, stderr_fd: int, console_input_fd: int = -1) -> None:
        """A QEMU inherited across a re-exec: still our child, but no Popen of this process."""
        self._watch(pid, os.fdopen(stderr_fd, "rb", buffering=0))
        self.console_input.adopt(console_input_fd)

    def _watch(self, pid: int, stderr: IO[bytes]) -> None:
        self.pid, self.stderr = pid, stderr
        self._pidfd = os.pidfd_open(pid)
        asyncio.get_running_loop().add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = -1
        if self._popen is not None:
            code = self._popen.wait()
        else:
            code = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        self.on_exit(code)

    def kill(self, sig: signal.Signals) -> None:
        if self._pidfd >= 0:
            self.signalled = True
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def check_guard(self, config: Config, guard: str) -> None:
        """The slirp guard must be loaded in QEMU itself: a static QEMU, or a wrapper that
        drops LD_PRELOAD, would run without it.  Checked while QEMU is held (``-S``)."""
        try:
            with open(f"/proc/{self.pid}/maps") as maps:
                loaded = any(line.rstrip("\n").endswith(" " + guard) for line in maps)
        except OSError:
            loaded = False
        if loaded:
            return
        if not config.network.host_loopback:
            raise ControllerError(
                f"the slirp guard is not loaded in QEMU (pid {self.pid}): guests would reach "
                f"the host's loopback; {config.qemu.binary} must be a dynamically linked QEMU "
                "that keeps LD_PRELOAD (no wrapper that drops it), or set "
                "network.host_loopback = true"
            )
        log.warning("the slirp guard is not loaded in QEMU: the agent has no private channel")

    async def read_stderr(self) -> None:
        assert self.stderr is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader),
            os.fdopen(self.stderr.fileno(), "rb", buffering=0, closefd=False),
        )
        self.stream = (transport, reader)
        while line := await reader.readline():
            text = line.decode(errors="replace").rstrip()
            self.stderr_tail.append(text)
            log.warning("qemu: %s", text)
        self.stderr_closed.set()

    async def exiting(self, grace: float) -> bool:
        """Whether stderr closes within ``grace``: the kernel closes all of QEMU's
        descriptors as it exits, so one closed stream with stderr open is no exit."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self.stderr_closed.wait()
        return self.stderr_closed.is_set()

    def close(self) -> None:
        if self.stderr is not None:
            self.stderr.close()
        self.console_input.close()


def _die_with_parent() -> None:
    """In the child: if vmhost dies, QEMU gets SIGTERM (a clean exit), not an orphan's life."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
