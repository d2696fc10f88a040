"""The QMP session with one QEMU, over the socket it inherited: connect, events, commands,
the hang probe, and pausing its stream for a handover.  The only module that reaches into
qemu.qmp's private fields."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Mapping
from typing import Any, Final, cast

from qemu.qmp import ConnectError, QMPClient, QMPError, Runstate

log = logging.getLogger(__name__)

COMMAND_TIMEOUT: Final = 5.0
EXTEND_EVERY: Final = 3.0
"""While QEMU builds its machine (no greeting yet), how often the start budget's hook runs."""

EventHandler = Callable[[str, dict[str, Any]], None]


class QmpSession:
    """QMP to one QEMU; what its events said that outlives them (the SHUTDOWN, whether
    the vCPUs are stopped) is kept here."""

    def __init__(self, name: str, on_event: EventHandler) -> None:
        self.client = QMPClient(name)
        self.on_event = on_event
        self.sock: socket.socket | None = None
        self.stream: tuple[asyncio.ReadTransport, asyncio.StreamReader] | None = None
        self.shutdown_event: dict[str, Any] | None = None
        self.vcpus_stopped = False
        self._disconnecting: asyncio.Task[None] | None = None
        self.probe_now = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self.client.runstate is Runstate.RUNNING

    async def connect(
        self,
        sock: socket.socket,
        *,
        budget: float,
        on_wait: Callable[[float], None] | None = None,
        greeting: bool = True,
    ) -> None:
        """Connect within ``budget`` seconds (QEMU greets only once its machine is built:
        a large preallocated guest takes long); ``on_wait(seconds_left)`` runs every few
        seconds meanwhile, so systemd can be asked for more time."""
        self.sock = sock  # kept open: a handover passes it on
        self.client.await_greeting = self.client.negotiate = greeting
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        ticker = asyncio.create_task(_tick(deadline, on_wait)) if on_wait else None
        try:
            async with asyncio.timeout_at(deadline):
                await self.client.connect(sock)
        except AssertionError:
            # qemu.qmp asserts that the session it set up runs: on a socket at its end (QEMU
            # gone during a handover) its reader has ended it by then.  A failed connect.
            if self.client.runstate is Runstate.RUNNING:
                raise
            await self.disconnect()
            raise ConnectError("QMP ended while connecting", EOFError("QMP closed")) from None
        finally:
            if ticker is not None:
                ticker.cancel()
        assert self.client._writer is not None and self.client._reader is not None
        transport = cast(asyncio.ReadTransport, self.client._writer.transport)
        self.stream = (transport, self.client._reader)

    async def execute(
        self,
        command: str,
        timeout: float = COMMAND_TIMEOUT,
        *,
        arguments: Mapping[str, object] | None = None,
    ) -> object:
        async with asyncio.timeout(timeout):
            return await self.client.execute(command, arguments)

    async def read_events(self) -> None:
        """Hand each event to ``on_event``, in order, until the session ends."""
        async for event in self.client.events:
            name = str(event["event"])
            data: dict[str, Any] = dict(event.get("data") or {})  # type: ignore[call-overload]
            if name == "SHUTDOWN":
                self.shutdown_event = data
            elif name in ("STOP", "RESUME"):
                self.vcpus_stopped = name == "STOP"
            self.on_event(name, data)

    async def read_to_end(self, grace: float) -> None:
        """Until QEMU's last QMP bytes are read and their events handled, or ``grace``.

        QEMU's descriptors close before its exit is visible, so by then the end of
        the stream is waiting: this takes what it said last (the SHUTDOWN event).
        """
        if not self.connected:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while self.client.runstate is Runstate.RUNNING:
                    await self.client.runstate_changed()
                while not self.client.events.empty():  # noqa: ASYNC110 - a queue has no event
                    await asyncio.sleep(0)  # read_events takes what the reader queued

    async def lost(self) -> None:
        """Until the session is lost (QEMU closed it, or it broke)."""
        while await self.client.runstate_changed() is not Runstate.DISCONNECTING:
            pass

    async def probe(
        self,
        interval: float,
        timeout: float,
        answered: Callable[[bool], None],
    ) -> None:
        """Every ``interval``, or at once when :attr:`probe_now` is set, a cheap command:
        ``answered`` whether it came back within ``timeout`` (a hung QEMU answers nothing,
        not even an error), while connected."""
        while self.connected:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self.probe_now.wait()
            self.probe_now.clear()
            try:
                await self.execute("query-status", timeout)
            except TimeoutError:
                answered(False)
                continue
            except QMPError:
                return
            answered(True)

    async def quiesce(self) -> None:
        """Let the events already read be handled: a handover follows."""
        if self.stream is not None and not self.stream[0].is_closing():
            await pause_at_line(*self.stream)
        while not self.client.events.empty():  # noqa: ASYNC110 - a queue has no such event
            await asyncio.sleep(0)

    async def disconnect(self) -> None:
        """One disconnect, run to its end even if its callers are cancelled: qemu.qmp's cut
        short leaves the reader's EOFError unretrieved, a traceback in the journal."""
        if self._disconnecting is None or self._disconnecting.done():
            # A failed connect is already idle; one in progress fails (and cleans up) alone.
            if self.client.runstate in (Runstate.IDLE, Runstate.CONNECTING):
                return
            self._disconnecting = asyncio.create_task(self._disconnect())
        await asyncio.shield(self._disconnecting)

    async def _disconnect(self) -> None:
        with contextlib.suppress(QMPError, OSError, EOFError):
            await self.client.disconnect()


async def pause_at_line(transport: asyncio.ReadTransport, reader: asyncio.StreamReader) -> None:
    """Stop reading from the kernel once what was read ends on a line boundary and is consumed.

    A half-read line is read to its end first: QMP messages must not be cut
    between two vmhosts.  asyncio shows no public view of a reader's buffer.
    """
    buffer: bytearray = reader._buffer  # type: ignore[attr-defined]
    transport.pause_reading()
    while buffer:
        if b"\n" in buffer:
            await asyncio.sleep(0)  # the reader's task takes its lines
        else:
            transport.resume_reading()
            await asyncio.sleep(0.001)
            transport.pause_reading()


async def _tick(deadline: float, on_wait: Callable[[float], None]) -> None:
    loop = asyncio.get_running_loop()
    while (left := deadline - loop.time()) > 0:
        await asyncio.sleep(min(EXTEND_EVERY, left))
        on_wait(max(deadline - loop.time(), 0.0))
