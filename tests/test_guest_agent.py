"""The guest-agent client against an in-test stereosd stand-in (unit level), and a real guest."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import VM, bare_qemu, free_port
from qemu.qmp import QMPClient

from vmhost import config as vmconfig
from vmhost.config import AgentConfig, ShareConfig
from vmhost.errors import AgentError
from vmhost.vm import agent as agent_client
from vmhost.vm.agent import Agent, Health, Lifecycle

HOST = "127.0.0.1"


def line(kind: str, payload: dict[str, Any] | None = None) -> bytes:
    message: dict[str, Any] = {"type": kind}
    if payload is not None:
        message["payload"] = payload
    return json.dumps(message).encode() + b"\n"


class FakeAgent:
    """stereosd as far as the wire goes, written with the stdlib json so it checks our encoding."""

    def __init__(self) -> None:
        self.port = 0
        self.requests: list[bytes] = []
        self.health = ["ready"]  # successive get_health states; the last one repeats
        self.refuse: dict[str, str] = {}  # type -> error text
        self.silent: set[str] = set()  # types never answered
        self.unsolicited: list[bytes] = []  # lines sent before every reply
        self.hang_up_first = 0  # connections closed at once, as QEMU's hostfwd does early on
        self.accepted: list[float] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.disconnected = asyncio.Event()
        self.received = asyncio.Event()

    @property
    def types(self) -> list[str]:
        return [json.loads(r)["type"] for r in self.requests]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted.append(asyncio.get_running_loop().time())
        self.writers.append(writer)
        if self.hang_up_first:
            self.hang_up_first -= 1
            writer.close()
            return
        try:
            while request := await reader.readline():
                self.requests.append(request)
                self.received.set()
                kind = json.loads(request)["type"]
                for extra in self.unsolicited:
                    writer.write(extra)
                if kind not in self.silent:
                    writer.write(self.reply(kind))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            self.disconnected.set()

    def reply(self, kind: str) -> bytes:
        if kind in self.refuse:
            return line("ack", {"reply_to": kind, "ok": False, "error": self.refuse[kind]})
        if kind == "ping":
            return line("pong")
        if kind == "get_health":
            state = self.health.pop(0) if len(self.health) > 1 else self.health[0]
            return line("health", {"state": state, "agents": ["sshd"], "uptime_seconds": 12})
        return line("ack", {"reply_to": kind, "ok": True})


async def serve(fake: FakeAgent, port: int = 0) -> asyncio.Server:
    server = await asyncio.start_server(fake.handle, HOST, port)
    fake.port = server.sockets[0].getsockname()[1]
    return server


@pytest.fixture
async def fake() -> AsyncIterator[FakeAgent]:
    fake = FakeAgent()
    server = await serve(fake)
    yield fake
    server.close()
    for writer in fake.writers:
        writer.close()
    await server.wait_closed()


@pytest.fixture
async def agent(fake: FakeAgent) -> AsyncIterator[Agent]:
    loop = asyncio.get_running_loop()
    agent = await Agent.connect((HOST, fake.port), deadline=loop.time() + 5, timeout=1.0)
    yield agent
    agent.close()


async def test_requests_on_the_wire(agent: Agent, fake: FakeAgent) -> None:
    """Each call sends the protocol.md envelope; an empty payload is left out."""
    await agent.ping()
    await agent.set_config('name = "x"\n')
    await agent.inject_ssh_key("admin", "ssh-ed25519 AAAA k")
    await agent.inject_secret("token", "s3cret")
    await agent.inject_secret("other", "v", 0o640)
    await agent.mount("share0", "/mnt/data", read_only=True)
    await agent.shutdown("host stop")
    assert fake.requests == [
        b'{"type":"ping"}\n',  # from connect()
        b'{"type":"ping"}\n',
        b'{"type":"set_config","payload":{"content":"name = \\"x\\"\\n"}}\n',
        b'{"type":"inject_ssh_key","payload":{"user":"admin","public_key":"ssh-ed25519 AAAA k"}}\n',
        b'{"type":"inject_secret","payload":{"name":"token","value":"s3cret","mode":384}}\n',
        b'{"type":"inject_secret","payload":{"name":"other","value":"v","mode":416}}\n',
        b'{"type":"mount","payload":{"tag":"share0","guest_path":"/mnt/data","fs_type":"9p","read_only":true}}\n',
        b'{"type":"shutdown","payload":{"reason":"host stop"}}\n',
    ]


async def test_health_is_decoded(agent: Agent, fake: FakeAgent) -> None:
    """get_health returns the agent's state, agents and uptime."""
    fake.health = ["degraded"]
    assert await agent.get_health() == Health(state="degraded", agents=["sshd"], uptime_seconds=12)


async def test_lifecycle_messages_are_skipped_and_kept(agent: Agent, fake: FakeAgent) -> None:
    """Unsolicited lifecycle lines before a reply do not count as the reply; the last is kept."""
    fake.unsolicited = [
        line("lifecycle", {"state": "booting", "message": "starting"}),
        line("lifecycle", {"state": "healthy", "message": "all good"}),
    ]
    assert agent.lifecycle is None
    await agent.set_config("")
    assert (await agent.get_health()).state == "ready"
    assert agent.lifecycle == Lifecycle(state="healthy", message="all good")


async def test_refusal_raises_and_keeps_connection(agent: Agent, fake: FakeAgent) -> None:
    """ok:false becomes AgentError with the agent's text; the connection stays in sync."""
    fake.refuse["inject_secret"] = "bad name"
    with pytest.raises(AgentError, match="inject_secret: refused by the agent: bad name"):
        await agent.inject_secret("../x", "v")
    await agent.ping()


async def test_no_reply_times_out_and_closes(agent: Agent, fake: FakeAgent) -> None:
    """A call that gets no reply fails after its timeout and the connection is dropped."""
    fake.silent.add("shutdown")
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(AgentError, match=r"shutdown: no reply within 0.2 s") as info:
        await agent.shutdown("stop", timeout=0.2)
    assert 0.2 <= loop.time() - start < 2  # its timeout, then a wide guard
    assert isinstance(info.value.__cause__, TimeoutError)
    await asyncio.wait_for(fake.disconnected.wait(), 1)
    with pytest.raises(AgentError, match="connection unusable"):
        await agent.ping()


async def test_cancellation_propagates_and_closes(agent: Agent, fake: FakeAgent) -> None:
    """Cancelling a waiting call raises CancelledError, never swallowed, and drops the stream."""
    fake.silent.add("get_health")
    task = asyncio.create_task(agent.get_health())
    await asyncio.wait_for(fake.received.wait(), 10)  # the request is out: the call waits
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(AgentError, match="connection unusable"):
        await agent.ping()


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"", "ping: the agent closed the connection"),
        (b"not json\n", "ping: JSON is malformed"),
        (line("health", {"state": "ready"}), "ping: unexpected reply 'health'"),
        (line("ack", {"reply_to": "mount", "ok": True}), "ping: got the ack of 'mount'"),
        (line("pong", {"x": "a" * agent_client.MAX_LINE}), "ping: .*limit"),
    ],
)
async def test_bad_replies_raise(reply: bytes, message: str) -> None:
    """EOF, garbage, a mismatched or an oversized reply is an AgentError, never a hang."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(reply)
        writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(HOST, port)
        agent = Agent(reader, writer, timeout=1.0)
        with pytest.raises(AgentError, match=message):
            await agent.ping()
        agent.close()


async def test_connect_backs_off_until_agent_listens() -> None:
    """Refused and hung-up attempts are retried 100 ms, 200 ms, ... apart until one answers."""
    fake = FakeAgent()
    fake.hang_up_first = 4
    server = await serve(fake)
    loop = asyncio.get_running_loop()
    agent = await Agent.connect((HOST, fake.port), deadline=loop.time() + 10)
    agent.close()
    server.close()
    gaps = [b - a for a, b in zip(fake.accepted, fake.accepted[1:], strict=False)]
    assert len(gaps) == 4
    print(f"\nback-off gaps: {', '.join(f'{g:.3f}' for g in gaps)} s")
    for gap, delay in zip(gaps, [0.1, 0.2, 0.4, 0.8], strict=True):
        assert delay <= gap < 2 * delay + 0.3  # doubling, not a fixed or a longer step
    assert fake.types == ["ping"]


async def test_connect_waits_for_a_late_listener() -> None:
    """Nothing listening yet is not an error while the deadline allows."""
    port = free_port()
    fake = FakeAgent()
    loop = asyncio.get_running_loop()
    connecting = asyncio.create_task(Agent.connect((HOST, port), deadline=loop.time() + 5))
    await asyncio.sleep(0.5)
    server = await serve(fake, port)
    agent = await asyncio.wait_for(connecting, 3)
    await agent.ping()
    agent.close()
    server.close()


async def test_connect_gives_up_at_deadline() -> None:
    """With no agent, connect ends with AgentError by the deadline, not later."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(AgentError, match=f"no guest agent at {HOST}:") as info:
        await Agent.connect((HOST, free_port()), deadline=start + 1.0)
    # The next try would start past the deadline; the upper bound is that deadline plus slack.
    assert 0.6 <= loop.time() - start <= 1.5
    assert isinstance(info.value.__cause__, OSError)


async def test_provision_runs_the_boot_sequence(fake: FakeAgent, tmp_path: Path) -> None:
    """connect, poll health until ready, config, admin key, secrets, share0.. mounts, in order."""
    jcard = tmp_path / "jcard.toml"
    jcard.write_text("[job]\nname = 'x'\n")
    fake.health = ["booting", "booting", "healthy"]
    config = AgentConfig(
        port=fake.port,
        config_file=str(jcard),
        ssh_public_key="ssh-ed25519 AAAA k",
        secrets={"a": "1", "b": "2"},
        shares=[
            ShareConfig(path="/srv/x", guest_path="/mnt/x", read_only=False),
            ShareConfig(path="/srv/y", guest_path="/mnt/y"),
        ],
    )
    loop = asyncio.get_running_loop()
    start = loop.time()
    agent = await agent_client.provision(config)
    assert 2 * agent_client.READY_POLL <= loop.time() - start < 1.0
    agent.close()
    assert fake.types == [
        "ping",
        "get_health",
        "get_health",
        "get_health",
        "set_config",
        "inject_ssh_key",
        "inject_secret",
        "inject_secret",
        "mount",
        "mount",
    ]
    payloads = [json.loads(r).get("payload") for r in fake.requests[4:]]
    assert payloads == [
        {"content": "[job]\nname = 'x'\n"},
        {"user": "admin", "public_key": "ssh-ed25519 AAAA k"},
        {"name": "a", "value": "1", "mode": 0o600},
        {"name": "b", "value": "2", "mode": 0o600},
        {"tag": "share0", "guest_path": "/mnt/x", "fs_type": "9p", "read_only": False},
        {"tag": "share1", "guest_path": "/mnt/y", "fs_type": "9p", "read_only": True},
    ]


async def test_provision_skips_what_is_not_configured(fake: FakeAgent) -> None:
    """Without config file, key, secrets or shares only the connect and readiness steps run."""
    agent = await agent_client.provision(AgentConfig(port=fake.port))
    agent.close()
    assert fake.types == ["ping", "get_health"]


async def test_provision_ready_timeout(fake: FakeAgent) -> None:
    """A guest that never becomes ready fails provisioning and the connection is closed."""
    fake.health = ["booting"]
    with pytest.raises(AgentError, match=r"not ready in time \(agent state 'booting'\)"):
        await agent_client.provision(AgentConfig(port=fake.port), ready_timeout=0.5)
    await asyncio.wait_for(fake.disconnected.wait(), 1)


async def test_provision_refusal_closes(fake: FakeAgent) -> None:
    """A refused step stops provisioning with that step's error."""
    fake.refuse["inject_ssh_key"] = "bad user"
    config = AgentConfig(port=fake.port, ssh_public_key="k", secrets={"a": "1"})
    with pytest.raises(AgentError, match="inject_ssh_key: refused by the agent: bad user"):
        await agent_client.provision(config)
    await asyncio.wait_for(fake.disconnected.wait(), 1)
    assert "inject_secret" not in fake.types


async def test_provision_unreadable_config_file(fake: FakeAgent, tmp_path: Path) -> None:
    """A config file that vanished since load is reported before any connection is made."""
    config = AgentConfig(port=fake.port, config_file=str(tmp_path / "gone.toml"))
    with pytest.raises(AgentError, match=r"agent\.config_file: cannot read"):
        await agent_client.provision(config)
    assert fake.accepted == []


async def test_provision_without_port() -> None:
    """No agent port configured means there is nothing to provision."""
    with pytest.raises(AgentError, match="no agent port"):
        await agent_client.provision(AgentConfig())


@pytest.mark.slow
async def test_real_guest_provision_and_shutdown(
    make_vm: Callable[..., VM], tmp_path: Path
) -> None:
    """QEMU from argv() boots the tiny guest; provision() and shutdown() work on its real agent."""
    jcard = tmp_path / "jcard.toml"
    jcard.write_text('[job]\nname = "demo"\nnote = "quote \\" and \\\\ slash"\n')
    (tmp_path / "share").mkdir()
    vm = make_vm(
        toml=f"""
[agent]
port = {free_port()}
config_file = "{jcard}"
ssh_public_key = "ssh-ed25519 AAAAC3Nza admin@host"
shares = [{{ path = "{tmp_path / "share"}", guest_path = "/srv", read_only = true }}]
"""
    )
    config = vmconfig.load(vm.config)
    loop = asyncio.get_running_loop()
    async with bare_qemu(config, "agent-test", agent_socket=tmp_path / "agent.sock") as qemu_vm:
        start = loop.time()
        agent = await agent_client.provision(
            config.agent,
            address=str(tmp_path / "agent.sock"),
            connect_timeout=60,
            ready_timeout=30,
        )
        provisioned = loop.time() - start
        assert (await agent.get_health()).state == "ready"
        start = loop.time()
        await agent.shutdown("test done")
        agent.close()
        async with asyncio.timeout(15):
            event = await first_shutdown(qemu_vm.qmp)  # qmp.events queues from connect on
            assert await qemu_vm.proc.wait() == 0
        stopped = loop.time() - start
    print(qemu_vm.console.decode(errors="replace"))  # shown by pytest on failure
    assert event["data"]["guest"] is True, event
    print(f"provision {provisioned:.2f} s, shutdown -> exit {stopped:.2f} s")
    assert vm.marker() == vm.token
    assert vm.marker("/agent/config.toml") == jcard.read_text().strip()
    assert vm.marker("/agent/ssh/admin/authorized_keys") == "ssh-ed25519 AAAAC3Nza admin@host"
    assert vm.marker("/agent/mounts") == "share0 /srv 9p true"


async def first_shutdown(qmp: QMPClient) -> Any:
    async for event in qmp.events:
        if event["event"] == "SHUTDOWN":
            return event
    raise AssertionError("QMP event stream ended without SHUTDOWN")
