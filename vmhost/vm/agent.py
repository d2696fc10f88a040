"""Client of the in-guest agent (stereosd): newline-delimited JSON over a stream.

vmhost reaches it through a unix socket that QEMU forwards to the guest's
port 1024 (see vmhost/slirp_guard.c); a ``(host, port)`` address is TCP.

The wire is protocol.md section 2: ``{"type": T, "payload": {...}}`` per line,
one reply per request on a persistent connection, with unsolicited
``lifecycle`` messages in between.  Every wait is bounded, and a call that
fails half-way (timeout, cancel, garbage) closes the connection: a late reply
could otherwise be taken as the answer to the next request.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec

from ..config import AgentConfig
from ..errors import AgentError

HOST: Final = "127.0.0.1"
CALL_TIMEOUT: Final = 10.0
CONNECT_TIMEOUT: Final = 120.0
READY_TIMEOUT: Final = 60.0
READY_POLL: Final = 0.2
ATTEMPT_TIMEOUT: Final = 3.0
"""One connect + ping try.  Before the guest's network is up, QEMU's user
networking accepts on the host and then never answers, so a try must give up
and reconnect rather than wait for the whole deadline."""
READY_STATES: Final = frozenset({"ready", "healthy"})
ADMIN_USER: Final = "admin"
SECRET_MODE: Final = 0o600
MAX_LINE: Final = 1 << 20


class Health(msgspec.Struct):
    state: str = ""
    agents: list[Any] = []
    uptime_seconds: float = 0.0


class Lifecycle(msgspec.Struct):
    state: str = ""
    message: str = ""


class Ack(msgspec.Struct):
    reply_to: str = ""
    ok: bool = False
    error: str = ""


class Pong(msgspec.Struct):
    pass


class SetConfig(msgspec.Struct):
    content: str


class InjectSSHKey(msgspec.Struct):
    user: str
    public_key: str


class InjectSecret(msgspec.Struct):
    name: str
    value: str
    mode: int = SECRET_MODE


class Mount(msgspec.Struct):
    tag: str
    guest_path: str
    fs_type: str = "9p"
    read_only: bool = False


class Shutdown(msgspec.Struct):
    reason: str


class _Outgoing(msgspec.Struct, omit_defaults=True):
    type: str
    payload: msgspec.Struct | None = None


class _Incoming(msgspec.Struct):
    type: str
    payload: msgspec.Raw = msgspec.Raw(b"{}")


Address = str | tuple[str, int]
"""A unix socket path, or a TCP (host, port)."""

_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(_Incoming)
_Reply = TypeVar("_Reply", Pong, Health, Ack)
_REPLY_TYPES: Final = {"ping": "pong", "get_health": "health"}


class Agent:
    """One connection to the guest agent; calls are serialised, each bounded by ``timeout``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        timeout: float = CALL_TIMEOUT,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._lock = asyncio.Lock()
        self._broken = ""
        self.timeout = timeout
        self.lifecycle: Lifecycle | None = None
        """The last unsolicited lifecycle message seen, if any."""

    @classmethod
    async def connect(
        cls, address: Address, *, deadline: float, timeout: float = CALL_TIMEOUT
    ) -> Agent:
        """Connect and ping, retrying (100 ms doubling to 1 s) until ``deadline`` (loop time).

        ``address`` is a unix socket path or a TCP ``(host, port)``.
        """
        loop = asyncio.get_running_loop()
        delay = 0.1
        where = address if isinstance(address, str) else f"{address[0]}:{address[1]}"
        while True:
            try:
                async with asyncio.timeout_at(min(deadline, loop.time() + ATTEMPT_TIMEOUT)):
                    if isinstance(address, str):
                        reader, writer = await asyncio.open_unix_connection(address, limit=MAX_LINE)
                    else:
                        reader, writer = await asyncio.open_connection(*address, limit=MAX_LINE)
                    agent = cls(reader, writer, timeout=timeout)
                    try:
                        await agent.ping()
                    except BaseException:
                        agent.close()
                        raise
                return agent
            except (OSError, TimeoutError, AgentError) as exc:
                if loop.time() + delay >= deadline:
                    raise AgentError(f"no guest agent at {where}: {exc or 'timed out'}") from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    def close(self) -> None:
        """Drop the connection at once; nothing useful is left to flush."""
        self._broken = self._broken or "closed"
        self._writer.transport.abort()

    async def ping(self, *, timeout: float | None = None) -> None:
        await self._call("ping", None, Pong, timeout)

    async def get_health(self, *, timeout: float | None = None) -> Health:
        return await self._call("get_health", None, Health, timeout)

    async def set_config(self, content: str, *, timeout: float | None = None) -> None:
        await self._call("set_config", SetConfig(content), Ack, timeout)

    async def inject_ssh_key(self, user: str, key: str, *, timeout: float | None = None) -> None:
        await self._call("inject_ssh_key", InjectSSHKey(user, key), Ack, timeout)

    async def inject_secret(
        self, name: str, value: str, mode: int = SECRET_MODE, *, timeout: float | None = None
    ) -> None:
        await self._call("inject_secret", InjectSecret(name, value, mode), Ack, timeout)

    async def mount(
        self,
        tag: str,
        guest_path: str,
        fs_type: str = "9p",
        *,
        read_only: bool = False,
        timeout: float | None = None,
    ) -> None:
        await self._call("mount", Mount(tag, guest_path, fs_type, read_only), Ack, timeout)

    async def shutdown(self, reason: str, *, timeout: float | None = None) -> None:
        """Ask the guest to power off; returns on the agent's ack, not when the VM is gone."""
        await self._call("shutdown", Shutdown(reason), Ack, timeout)

    async def _call(
        self,
        kind: str,
        payload: msgspec.Struct | None,
        reply: type[_Reply],
        timeout: float | None,
    ) -> _Reply:
        limit = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit), self._lock:
                if self._broken:
                    raise AgentError(f"{kind}: connection unusable ({self._broken})")
                try:
                    answer = await self._exchange(kind, payload, reply)
                except BaseException as exc:
                    self._broken = f"{kind} failed: {type(exc).__name__}"
                    self._writer.transport.abort()
                    raise
        except TimeoutError as exc:
            raise AgentError(f"{kind}: no reply within {limit} s") from exc
        except (OSError, ValueError) as exc:  # msgspec.DecodeError and line overruns are ValueError
            raise AgentError(f"{kind}: {exc or type(exc).__name__}") from exc
        if isinstance(answer, Ack) and not answer.ok:
            raise AgentError(f"{kind}: refused by the agent: {answer.error or 'no reason given'}")
        if not isinstance(answer, reply):
            raise AgentError(f"{kind}: answered with a bare ack")
        return answer

    async def _exchange(
        self, kind: str, payload: msgspec.Struct | None, reply: type[_Reply]
    ) -> _Reply | Ack:
        """Send one request and read up to its reply; any error here desyncs the stream."""
        self._writer.write(_encoder.encode(_Outgoing(kind, payload)) + b"\n")
        await self._writer.drain()
        expected = _REPLY_TYPES.get(kind, "ack")
        while True:
            line = await self._reader.readline()
            if not line:
                raise AgentError(f"{kind}: the agent closed the connection")
            message = _decoder.decode(line)
            if message.type == "lifecycle":
                self.lifecycle = msgspec.json.decode(message.payload, type=Lifecycle)
            elif message.type == "ack":  # the answer to any request that failed
                ack = msgspec.json.decode(message.payload, type=Ack)
                if ack.reply_to != kind:
                    raise AgentError(f"{kind}: got the ack of {ack.reply_to!r}")
                return ack
            elif message.type == expected:
                return msgspec.json.decode(message.payload, type=reply)
            else:
                raise AgentError(f"{kind}: unexpected reply {message.type!r}")


async def provision(
    config: AgentConfig,
    *,
    address: Address | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
    ready_timeout: float = READY_TIMEOUT,
    timeout: float = CALL_TIMEOUT,
) -> Agent:
    """The boot sequence of protocol.md: connect, wait ready, config, key, secrets, mounts.

    Returns the connected agent (kept for ``shutdown`` later); on any failure
    the connection is closed and AgentError raised.  ``address`` defaults to
    TCP on ``config.port`` of this host.
    """
    if not config.port:
        raise AgentError("provision: no agent port configured")
    content = None
    if config.config_file:
        try:
            content = await asyncio.to_thread(Path(config.config_file).read_text, "utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AgentError(f"agent.config_file: cannot read {config.config_file}: {exc}") from exc
    loop = asyncio.get_running_loop()
    agent = await Agent.connect(
        address or (HOST, config.port), deadline=loop.time() + connect_timeout, timeout=timeout
    )
    try:
        await _wait_ready(agent, loop.time() + ready_timeout)
        if content is not None:
            await agent.set_config(content)
        if config.ssh_public_key:
            await agent.inject_ssh_key(ADMIN_USER, config.ssh_public_key)
        for name, value in config.secrets.items():
            await agent.inject_secret(name, value)
        for i, share in enumerate(config.shares):
            await agent.mount(f"share{i}", share.guest_path, read_only=share.read_only)
    except BaseException:
        agent.close()
        raise
    return agent


async def _wait_ready(agent: Agent, deadline: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        health = await agent.get_health(
            timeout=max(0.0, min(agent.timeout, deadline - loop.time()))
        )
        if health.state in READY_STATES:
            return
        if loop.time() + READY_POLL >= deadline:
            raise AgentError(f"guest not ready in time (agent state {health.state!r})")
        await asyncio.sleep(READY_POLL)
