"""When the guest is ready: what ``[boot] ready`` waits for, and for how long.

``"qemu"`` waits for nothing more than QEMU running; ``"agent"`` for the
controller's provisioning to finish; ``"notify"`` for ``READY=1`` on the
guest's notify port; ``"ssh"`` for an ``SSH-`` banner on the forwarded port.
Only the first boot's wait is bounded (it is what ``systemctl start`` waits
for): a guest that reboots later is ``booting`` again until it says so, but is
not stopped for taking long.  The controller makes every move of the run-state;
this module answers its questions (booting or running? does a reset boot again?),
tells it ``ready`` (once per boot, with how long it took), and stops the VM when
the first boot's wait ends without the guest.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final, cast

from ..config import BootConfig, Config, ReadyMode
from .state import VMState

log = logging.getLogger(__name__)

NOTIFY_PORT: Final = "org.vmhost.notify.0"
MAX_LINE: Final = 4096
"""A longer notify line is dropped: the guest chooses what it writes, not what vmhost holds."""
MAX_STATUS: Final = 200
"""Characters of the guest's STATUS= text passed on to systemd."""
GARBAGE_LOGGED: Final = 5
"""Unusable notify lines logged per boot; beyond that they are dropped silently."""
SSH_ATTEMPT: Final = 2.0
"""One connect + banner try: before the guest listens, QEMU's user networking may accept
on the host and then say nothing."""
SSH_INTERVAL: Final = 0.25

_WAITS_FOR: Final[dict[ReadyMode, str]] = {
    "qemu": "QEMU",
    "agent": "the guest agent's provisioning",
    "notify": f"READY=1 on {NOTIFY_PORT}",
    "ssh": "an SSH banner",
}

_KEY: Final = re.compile(rb"[A-Z][A-Z0-9_]*")
"""sd_notify's variable names."""

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


class Readiness:
    """One VM's readiness across its boots; ``on_ready(message)`` once per boot,
    ``on_not_ready()`` (the VM's graceful stop, which may take ``stop_seconds``) when
    the first boot's wait ends without it (``failure`` says why), ``on_status()`` when
    the guest's STATUS= text changes while it boots."""

    def __init__(
        self,
        config: Config,
        spawn: Spawn,
        on_ready: Callable[[str], None],
        on_not_ready: Callable[[], Awaitable[None]],
        stop_seconds: float,
    ) -> None:
        boot = config.boot or BootConfig()
        ssh_port = config.network.ssh_port
        self.mode: ReadyMode = boot.ready
        self.timeout = float(boot.ready_timeout_seconds)
        self.guest_status = ""
        """The guest's last ``STATUS=`` text (notify mode), for systemd's STATUS=."""
        self.note = ""
        """What booting waits for, or how long the last boot took: ``message`` in detail answers."""
        self._ssh_port = ssh_port
        self._spawn = spawn
        self._on_ready = on_ready
        self._on_not_ready = on_not_ready
        self.on_status: Callable[[], None] = lambda: None
        self._stop_seconds = stop_seconds
        self.failure = ""
        """Why the first boot's wait ended without the guest ("" if it did not)."""
        self._since = 0.0
        """When this boot began (monotonic): QEMU's start, or the guest's last reset."""
        self._deadline = 0.0
        """The first boot's end: QEMU's start + ready_timeout_seconds, whatever resets come."""
        self._first = True
        self._waiting = False
        self._garbage = 0
        self._tasks: list[asyncio.Task[None]] = []
        """This boot's: the SSH probe, the first boot's timer."""
        self._sock: socket.socket | None = None
        """vmhost's end of the notify port's channel (notify mode)."""
        self.stream: tuple[asyncio.ReadTransport, asyncio.StreamReader] | None = None
        """The notify port as read through a transport: paused at a handover."""
        self.first_ready = asyncio.Event()
        """Set once the guest is first ready: when systemd is told READY=1."""

    @property
    def waits(self) -> bool:
        """Whether the guest has a ``booting`` phase at all."""
        return self.mode != "qemu"

    @property
    def waiting(self) -> bool:
        return self._waiting

    def left(self) -> float:
        """Seconds the first boot may still take; 0 once it is over."""
        if not (self._waiting and self._first):
            return 0.0
        return max(self._deadline - time.monotonic(), 0.0)

    def start_left(self) -> float:
        """Seconds the start may still take (EXTEND_TIMEOUT_USEC): the wait, then a stop."""
        left = self.left()
        return left + self._stop_seconds if left else 0.0

    def live(self) -> VMState:
        """The state of a VM whose vCPUs run: booting until the guest is ready."""
        return VMState.BOOTING if self._waiting else VMState.RUNNING

    def reset(self, state: VMState) -> bool:
        """The guest was reset: wait for it again (unless it is being stopped); whether the
        VM in ``state`` goes back to booting (a running one: QEMU may report a reset twice)."""
        if not self.waits or state is VMState.STOPPING:
            return False
        self.begin(time.monotonic())
        return state is VMState.RUNNING

    def started(self, since: float) -> str:
        """QEMU runs the guest since ``since``: it boots now (and the start's message gets
        ``; waiting for ...``), or it is ready (the message gets nothing)."""
        if not self.waits:
            self.first_ready.set()
            return ""
        self.begin(since)
        return f"; {self.note}"

    def begin(self, since: float) -> None:
        """The guest boots from ``since`` (monotonic: QEMU's start, or its reset): wait for it."""
        self._cancel()
        if self._first and not self._deadline:
            self._deadline = since + self.timeout
        self._waiting, self._since, self._garbage = True, since, 0
        self.guest_status = ""
        clock = time.strftime("%H:%M:%S", time.localtime(time.time() - (time.monotonic() - since)))
        self.note = f"waiting for {_WAITS_FOR[self.mode]} since {clock}"
        if self.mode == "ssh":
            self._tasks.append(self._spawn(self._probe_ssh()))
        if self._first:
            self._tasks.append(self._spawn(self._expire()))

    def adopt(self, note: str, notify_fd: int) -> None:
        """Taken over after a reload: the first boot is over (only a ready VM is handed over)."""
        self._first, self.note = False, note
        self.first_ready.set()
        if notify_fd >= 0:
            self._sock = socket.socket(fileno=notify_fd)

    def ready(self, how: str) -> None:
        """The guest is ready (``how``: what said so); nothing if it was not waited for."""
        if not self._waiting:
            return
        since = self._deadline - self.timeout if self._first else self._since
        took = time.monotonic() - since
        after = "QEMU started" if self._first else "its reset"
        self._end()
        self.note = f"guest ready {took:.2f} s after {after}"
        self.first_ready.set()
        self._on_ready(f"{self.note} ({how})")

    def failed(self, reason: str) -> None:
        """What the first boot waits for cannot come any more (agent provisioning failed)."""
        if self._waiting and self._first:
            self._end()
            self.note = f"guest not ready: {reason}"
            self.failure = reason
            log.error("guest not ready: %s; stopping it", reason)
            self._spawn(_awaited(self._on_not_ready()))
        elif self._waiting:
            log.warning("guest not ready after its reset: %s", reason)

    def provisioned(self, error: str = "") -> None:
        """The controller's agent provisioning ended (``error`` if it failed)."""
        if self.mode == "agent" and error:
            self.failed(f"guest agent: {error}")
        elif self.mode == "agent":
            self.ready("guest agent provisioned")

    def status_text(self) -> str:
        """``STATUS=`` while booting: what vmhost waits for, since when, and the guest's word."""
        text = f"booting: {self.note} ({time.monotonic() - self._since:.0f} s"
        text += f", {self.left():.0f} s left)" if self._first else ")"
        return f"{text}; guest: {self.guest_status}" if self.guest_status else text

    def stop_waiting(self) -> None:
        """A stop was asked: nothing is waited for any more."""
        self._waiting = False
        self._cancel()

    def close(self) -> None:
        """Once its reader is gone: stop waiting, release the channel."""
        self.stop_waiting()
        if self._sock is not None:
            self._sock.close()

    def _end(self) -> None:
        self._waiting = False
        self._first = False
        self._cancel()

    def _cancel(self) -> None:
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self._tasks.clear()

    async def _expire(self) -> None:
        await asyncio.sleep(self.left())
        self.failed(f"not ready within ready_timeout_seconds ({self.timeout:g} s)")

    # -- the notify port ---------------------------------------------------------

    def guest_end(self) -> socket.socket | None:
        """A new channel for the notify port (notify mode only): QEMU's end, which the
        caller passes to QEMU and then closes; vmhost keeps the other."""
        if self.mode != "notify":
            return None
        self._sock, theirs = socket.socketpair()
        return theirs

    @property
    def notify_fd(self) -> int:
        """vmhost's end of the notify port, to hand over at a reload; -1 without one."""
        return self._sock.fileno() if self._sock is not None else -1

    async def listen(self) -> None:
        """Read the notify port (if there is one) from now on, for the VM's life."""
        if self._sock is not None:
            self.stream = await open_notify(self._sock)
            self._spawn(self.read_notify(self.stream[1]))

    async def read_notify(self, reader: asyncio.StreamReader) -> None:
        """The guest's notify lines for the VM's whole life (each boot writes again), until EOF.

        The port is a byte stream in sd_notify's form: ``KEY=VALUE`` lines.
        ``READY=1`` and ``STATUS=`` are used; other keys are sd_notify's and
        mean nothing here; anything else is logged (a few per boot) and dropped.
        """
        dropping = False  # inside a line longer than MAX_LINE, up to its newline
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError:
                return
            except asyncio.LimitOverrunError as e:
                await reader.readexactly(e.consumed)
                dropping = True
                continue
            if dropping:
                dropping = False
                self._garbage_line(f"a line longer than {MAX_LINE} bytes")
                continue
            self._notify_line(line.rstrip(b"\r\n"))

    def _notify_line(self, line: bytes) -> None:
        key, eq, value = line.partition(b"=")
        if not eq or not _KEY.fullmatch(key):
            if line.strip():
                self._garbage_line(repr(line[:80]))
            return
        if key == b"READY":
            if value == b"1":
                self.ready(f"READY=1 on {NOTIFY_PORT}")
        elif key == b"STATUS":
            text = value.decode(errors="replace")
            self.guest_status = "".join(c if c.isprintable() else "?" for c in text)[:MAX_STATUS]
            log.info("guest status: %s", self.guest_status, extra={"VMHOST_GUEST_STATUS": "1"})
            if self._waiting:
                self.on_status()

    def _garbage_line(self, what: str) -> None:
        self._garbage += 1
        if self._garbage <= GARBAGE_LOGGED:
            more = " (further ones are not logged)" if self._garbage == GARBAGE_LOGGED else ""
            log.warning("%s: ignored %s%s", NOTIFY_PORT, what, more)

    # -- the SSH probe -------------------------------------------------------------

    async def _probe_ssh(self) -> None:
        while True:
            if await ssh_banner(self._ssh_port):
                self.ready(f"SSH banner on 127.0.0.1:{self._ssh_port}")
                return
            await asyncio.sleep(SSH_INTERVAL)


async def ssh_banner(port: int, *, timeout: float = SSH_ATTEMPT) -> bool:
    """Whether 127.0.0.1:``port`` answers with an ``SSH-`` line within ``timeout``."""
    writer = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=MAX_LINE)
            line = await reader.readline()
    except (OSError, TimeoutError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.transport.abort()
    return line.startswith(b"SSH-")


async def open_notify(
    sock: socket.socket,
) -> tuple[asyncio.ReadTransport, asyncio.StreamReader]:
    """vmhost's end of the notify port, read through a transport (paused at a handover)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    transport, _ = await loop.connect_accepted_socket(
        lambda: asyncio.StreamReaderProtocol(reader), sock
    )
    return cast(asyncio.ReadTransport, transport), reader


async def _awaited(awaitable: Awaitable[None]) -> None:
    await awaitable
