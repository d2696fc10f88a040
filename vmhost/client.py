"""Python client for the control socket, the Go ``Client`` in sync and asyncio flavours.

Like the Go client: dial with a 5 s timeout, one request per connection, a
30 s deadline for the whole exchange, and ``ok:false`` becomes an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import Generic, TypeVar

import msgspec

from .control import wire
from .control.wire import Request, Response
from .errors import ClientError, NotListeningError, ServerError
from .vm.state import VMState

DIAL_TIMEOUT = 5.0
DEADLINE = 30.0
_MAX_LINE = 1024 * 1024
_ENDED = frozenset(state.wire for state in VMState if state.ended)
R = TypeVar("R")


def _result(line: bytes, path: Path) -> Response:
    if not line.endswith(b"\n"):
        raise ClientError(f"{path}: connection closed before a complete answer")
    try:
        response = wire.decode_response(line)
    except msgspec.DecodeError as e:
        raise ClientError(f"{path}: malformed answer: {e}") from e
    if not response.ok:
        raise ServerError(response.error or "request failed")
    return response


class _Calls(Generic[R]):
    """The Go client's methods, shared by both flavours: each returns ``call``'s result."""

    def __init__(
        self,
        path: str | Path,
        *,
        dial_timeout: float = DIAL_TIMEOUT,
        deadline: float = DEADLINE,
        detail: bool = False,
    ) -> None:
        self.path = Path(path)
        self.dial_timeout = dial_timeout
        self.deadline = deadline
        self.detail = detail

    def call(self, request: Request) -> R:
        raise NotImplementedError

    def status(self) -> R:
        return self.call(Request(method=wire.STATUS, detail=self.detail))

    def info(self) -> R:
        return self.call(Request(method=wire.INFO, detail=self.detail))

    def stop(self, timeout_seconds: int = 0) -> R:
        request = Request(method=wire.STOP, timeout_seconds=timeout_seconds, detail=self.detail)
        return self.call(request)

    def force_stop(self) -> R:
        return self.call(Request(method=wire.FORCE_STOP))

    def migrate(self, uri: str) -> R:
        """Start a live migration to the target listening at ``uri`` (a vmhost extension)."""
        return self.call(Request(method=wire.MIGRATE, uri=uri, detail=self.detail))


class Client(_Calls[Response]):
    """Blocking client; each call is one connection."""

    def is_alive(self) -> bool:
        try:
            self.status()
        except ClientError:
            return False
        return True

    def call(self, request: Request) -> Response:
        return next(self._exchange(request))

    def logs(self, lines: int = 10, *, follow: bool = False) -> Iterator[str]:
        """This VM's journal lines, through the server (a vmhost extension)."""
        for response in self._exchange(Request(method=wire.LOGS, lines=lines, follow=follow)):
            yield response.message

    def watch(self) -> Iterator[Response]:
        """The VM's state now, then each change as it happens, until the VM ends (a vmhost
        extension); raises :class:`ClientError` if the stream ends before that."""
        return _until_ended(self._exchange(Request(method=wire.WATCH, detail=True)), self.path)

    def _exchange(self, request: Request) -> Iterator[Response]:
        end = time.monotonic() + self.deadline
        stream = request.method in wire.STREAMS
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.dial_timeout)
                try:
                    sock.connect(str(self.path))
                except (FileNotFoundError, ConnectionRefusedError) as e:
                    raise NotListeningError(f"{self.path}: {e.strerror}") from e
                sock.settimeout(max(end - time.monotonic(), 0.001))
                sock.sendall(wire.encode_request(request))
                with sock.makefile("rb") as reader:
                    while line := reader.readline(_MAX_LINE):
                        yield _result(line, self.path)
                        if not stream:
                            return
                        endless = request.follow or request.method == wire.WATCH
                        sock.settimeout(None if endless else self.deadline)
        except OSError as e:
            raise ClientError(f"{self.path}: {e.strerror or e}") from e
        if not stream:
            raise ClientError(f"{self.path}: connection closed without an answer")


class AsyncClient(_Calls[Awaitable[Response]]):
    """asyncio client with the same surface as :class:`Client`."""

    def call(self, request: Request) -> Awaitable[Response]:
        return self._call(request)

    async def is_alive(self) -> bool:
        try:
            await self.status()
        except ClientError:
            return False
        return True

    async def _call(self, request: Request) -> Response:
        """The first answer of a stream, within the whole exchange's deadline."""
        try:
            async with (
                asyncio.timeout(self.deadline),
                contextlib.aclosing(self._stream(request)) as answers,
            ):
                async for response in answers:
                    return response
        except TimeoutError as e:
            raise ClientError(f"{self.path}: timed out") from e
        raise ClientError(f"{self.path}: connection closed without an answer")

    async def logs(self, lines: int = 10, *, follow: bool = False) -> AsyncIterator[str]:
        async for response in self._stream(Request(method=wire.LOGS, lines=lines, follow=follow)):
            yield response.message

    async def watch(self) -> AsyncIterator[Response]:
        """As :meth:`Client.watch`."""
        ended = False
        async for response in self._stream(Request(method=wire.WATCH, detail=True)):
            yield response
            ended = _ended(response)
        if not ended:
            raise _cut_short(self.path)

    async def _stream(self, request: Request) -> AsyncGenerator[Response, None]:
        try:
            async with asyncio.timeout(self.dial_timeout):
                reader, writer = await asyncio.open_unix_connection(self.path, limit=_MAX_LINE)
            try:
                writer.write(wire.encode_request(request))
                while line := await reader.readline():
                    yield _result(line, self.path)
            finally:
                writer.close()
        except TimeoutError as e:
            raise ClientError(f"{self.path}: timed out") from e
        except (OSError, ValueError) as e:
            raise ClientError(f"{self.path}: {e}") from e


def _ended(response: Response) -> bool:
    return response.state in _ENDED


def _cut_short(path: Path) -> ClientError:
    return ClientError(f"{path}: watch ended before the VM did (vmhost gone, or watcher too slow)")


def _until_ended(responses: Iterator[Response], path: Path) -> Iterator[Response]:
    ended = False
    for response in responses:
        yield response
        ended = _ended(response)
    if not ended:
        raise _cut_short(path)
