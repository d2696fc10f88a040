"""Re-executing ``vmhost serve`` in place, so new code takes over a running guest untouched.

On SIGHUP (``systemctl reload``, a package upgrade) or an internal error,
vmhost execs its own entry point again in the same PID: systemd's MAINPID,
the cgroup and QEMU's parent stay.  QEMU's PR_SET_PDEATHSIG fires when the
*thread* that forked it ends; execve from that thread (the loop's, the main
one) keeps it, so QEMU lives on.  The listening socket, QMP, the console and
QEMU's stderr are inherited as descriptors; the rest is a small
:class:`Handover` in a memfd whose number travels in ``$VMHOST_HANDOVER``.

Clients notice nothing: the old vmhost stops accepting and lets open
connections finish; new ones wait in the listen backlog until the new vmhost
answers them.  SIGHUP, SIGTERM and SIGINT are held blocked from the start of
a reload and across the exec (the mask is inherited, pending signals too), so
one arriving meanwhile is handled by the new vmhost once QEMU is its own, not
by the default action.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, NoReturn

import msgspec

from . import __version__, journal, notify
from .config import Config
from .control.server import Server
from .errors import ReloadRefusedError
from .machined import POWEROFF
from .pidfile import PidFile
from .vm.controller import QemuController
from .vm.handover import RunningQemu as VMHandover

log = logging.getLogger(__name__)

HANDOVER_ENV: Final = "VMHOST_HANDOVER"
FAULT_ENV: Final = "VMHOST_TEST_FAULT"
"""Test-only: when set (to anything), SIGUSR2 plants an internal error, a stand-in for a bug."""
RELOADED: Final = "vmhost reloaded"
"""The last line of log streams that a reload ends: reconnect to follow on."""
REEXEC_LIMIT: Final = 3
REEXEC_WINDOW: Final = 300.0
"""At most REEXEC_LIMIT re-execs for internal errors within this many seconds; then fail."""
DRAIN_TIMEOUT: Final = 1.0
"""Open control connections get this long to finish before the exec."""
HELD_SIGNALS: Final = frozenset({signal.SIGHUP, signal.SIGTERM, signal.SIGINT, POWEROFF})
_FORMAT: Final = 1


class Handover(msgspec.Struct, frozen=True, kw_only=True):
    """What one vmhost tells the next.  Any vmhost must read an older one's: new fields
    come with defaults, and none is ever removed or changes meaning."""

    format: int = _FORMAT
    version: str
    """Of the vmhost that wrote it."""
    reason: str
    since_ns: int
    """CLOCK_MONOTONIC (system-wide, so it survives the exec) when the reload began."""
    name: str
    config: Config
    """As QEMU was started with it: a changed file takes effect at the next start."""
    listen_fd: int
    socket_path: str = ""
    """The control socket's path when vmhost bound it itself: removed when the service ends."""
    vm: VMHandover
    pid_file: str = ""
    pid_file_fd: int = -1
    """The locked PID file (:class:`vmhost.pidfile.PidFile`), when there is one."""
    reexecs: list[float] = []
    """CLOCK_MONOTONIC seconds of the re-execs for internal errors."""


def take() -> Handover | None:
    """The handover a previous vmhost of this PID left, if this process is a re-exec."""
    value = os.environ.pop(HANDOVER_ENV, None)
    if value is None:
        return None
    fd = int(value)
    try:
        data = b""
        while chunk := os.pread(fd, 1 << 16, len(data)):
            data += chunk
    finally:
        os.close(fd)
    handover = msgspec.json.decode(data, type=Handover)
    for inherited in _fds(handover):
        os.set_inheritable(inherited, False)  # QEMU or a later child must not hold them
    return handover


class Reloader:
    """Runs reloads (SIGHUP) and re-execs after internal errors, one at a time."""

    def __init__(
        self,
        *,
        server: Server,
        controller: QemuController,
        notifier: notify.Notifier,
        socket_path: Path | None,
        pid_file: PidFile | None,
        reexecs: list[float],
        stop_asked: Callable[[], bool],
    ) -> None:
        self.server = server
        self.stop_asked = stop_asked
        self.controller = controller
        self.notifier = notifier
        self.socket_path = socket_path
        self.pid_file = pid_file
        self.reexecs = reexecs
        self._task: asyncio.Task[None] | None = None

    def request(self, reason: str) -> None:
        """A reload, started from a signal handler; one already running absorbs it."""
        log.info("%s received: reload", reason)
        if self._task is not None and not self._task.done():
            log.info("a reload is already running")
            return
        self._task = asyncio.ensure_future(self._reload(reason, self.reexecs))

    async def recover(self, error: BaseException) -> None:
        """After an internal error: re-exec unless it happened too often; returns if not."""
        now = time.monotonic()
        recent = [t for t in self.reexecs if now - t < REEXEC_WINDOW]
        if len(recent) >= REEXEC_LIMIT:
            log.error("internal error again: %d re-execs in %.0f s", len(recent), REEXEC_WINDOW)
            return
        log.error("internal error, re-executing vmhost: %r", error, exc_info=error)
        await self._reload(f"internal error: {error!r}", [*recent, now])

    async def _reload(self, reason: str, reexecs: list[float]) -> None:
        since = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        # Held from here, so none is caught and then lost in the exec: whichever vmhost
        # serves next handles it.  One caught just before has had its handler run by now.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
        refusal = self.controller.handover_refusal()
        if self.stop_asked():
            refusal = "a stop is running (it goes on)"
        if refusal:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            log.warning("reload refused: %s", refusal)
            return
        self.notifier.reloading(f"reloading ({reason})")
        try:
            listening = await self.server.drain(DRAIN_TIMEOUT, RELOADED)
            vm = await self.controller.handover()
            handover = Handover(
                version=__version__,
                reason=reason,
                since_ns=since,
                name=self.controller.name,
                config=self.controller.config,
                listen_fd=listening.fileno(),
                socket_path=str(self.socket_path or ""),
                vm=vm,
                pid_file=str(self.pid_file.path) if self.pid_file else "",
                pid_file_fd=self.pid_file.fd if self.pid_file else -1,
                reexecs=reexecs,
            )
            log.info("re-executing vmhost %s (%s)", __version__, reason)
            _exec(handover)
        except Exception as e:  # whatever failed: serve again, and let the signals through
            if isinstance(e, ReloadRefusedError | OSError):
                log.warning("reload refused: %s; this vmhost goes on", e)
            else:
                log.exception("reload failed: %r; this vmhost goes on", e)
            self.controller.resume()
            await self.server.resume()
            self.notifier.ready(self.controller.status_text())
        finally:  # reached only when the exec did not happen
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def reloaded(self, handover: Handover) -> None:
        """In the new vmhost, once it serves: READY=1 and one log line with the time it took."""
        took = (time.clock_gettime_ns(time.CLOCK_MONOTONIC) - handover.since_ns) / 1e9
        self.notifier.ready(self.controller.status_text())
        journal.log_event(
            journal.Event.RELOADED,
            f"vmhost reloaded ({handover.reason}): {handover.version} -> {__version__} "
            f"in {took:.3f} s, QEMU pid {self.controller.pid}",
            VMHOST_RELOAD_SECONDS=f"{took:.3f}",
        )


def _exec(handover: Handover) -> NoReturn:
    """Exec our own entry point again, handing ``handover`` over; returns only by raising
    OSError (then everything is as it was, and this vmhost goes on)."""
    fds = _fds(handover)
    memfd = os.memfd_create("vmhost-handover", 0)  # no MFD_CLOEXEC: the next vmhost reads it
    try:
        os.write(memfd, msgspec.json.encode(handover))
        env = {**os.environ, HANDOVER_ENV: str(memfd)}
        for fd in fds:
            os.set_inheritable(fd, True)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(*_entry_point(), env)
    finally:  # only reached when execve failed
        os.close(memfd)
        for fd in fds:
            os.set_inheritable(fd, False)


def _fds(handover: Handover) -> tuple[int, ...]:
    """The descriptors that cross the exec."""
    lock = (handover.pid_file_fd,) if handover.pid_file_fd >= 0 else ()
    return (handover.listen_fd, *handover.vm.fds, *lock)


def _entry_point() -> tuple[str, list[str]]:
    """What this process was started as: the ``vmhost`` script itself when it was (so the
    kernel names the process after it again, as ps and systemctl status show), else this
    interpreter with its arguments (``python -m vmhost serve ...``)."""
    script = sys.argv[0]
    if sys.orig_argv[1:2] == [script] and os.access(script, os.X_OK):
        return script, sys.orig_argv[1:]
    return sys.executable, [sys.executable, *sys.orig_argv[1:]]


def hold_signals_in_workers() -> None:
    """Worker threads (``asyncio.to_thread``, cysystemd's journal reads: the loop's default
    executor) block :data:`HELD_SIGNALS` for good.

    The kernel hands a process-directed signal to any thread that does not block it: one
    taken by a worker while a reload holds them in the loop's thread would be lost in the
    exec.  Only the loop's thread takes them, and it holds them across a reload.
    """
    executor = concurrent.futures.ThreadPoolExecutor(
        thread_name_prefix="vmhost-worker",
        initializer=signal.pthread_sigmask,
        initargs=(signal.SIG_BLOCK, HELD_SIGNALS),
    )
    asyncio.get_running_loop().set_default_executor(executor)


def install_signals(reloader: Reloader, fault: Callable[[], None]) -> None:
    """SIGHUP reloads; with ``$VMHOST_TEST_FAULT``, SIGUSR2 calls ``fault``.  Then the signals
    held blocked across an exec are let through."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, reloader.request, "SIGHUP")
    if os.environ.get(FAULT_ENV):
        loop.add_signal_handler(signal.SIGUSR2, fault)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD_SIGNALS)
