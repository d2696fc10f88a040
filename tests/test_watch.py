"""`watch`: the controller's change fan-out, then the wire against the server with a stand-in
controller (test_watch_e2e.py: the CLI against a real VM)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import msgspec
import pytest
from conftest import FakeController
from serving import STATUS, WATCH, ask

from vmhost.cli import vmhostctl_main
from vmhost.client import AsyncClient
from vmhost.control.server import Server
from vmhost.errors import TooManyWatchersError
from vmhost.vm.state import Change, Changes, VMState, Watcher

RUNNING = Change(VMState.RUNNING, "QEMU runs")
STOPPING = Change(VMState.STOPPING, "stop requested, 30 s to finish")
STEP = Change(VMState.STOPPING, "stop: ACPI power-down (30.0 s for it)", "acpi-power-down")
STOPPED = Change(VMState.STOPPED, "stop requested")


def drain(watcher: Watcher) -> list[Change]:
    taken = []
    while (change := watcher.take()) is not None:
        taken.append(change)
    return taken


def test_snapshot_then_changes_in_order() -> None:
    """The snapshot is the last change published; every later one follows, none twice."""
    changes = Changes()
    changes.publish(RUNNING)
    wakes: list[int] = []
    watcher = changes.watch(lambda: wakes.append(1))
    assert watcher.snapshot == RUNNING
    assert watcher.take() is None
    for change in (STOPPING, STEP, STOPPED):
        changes.publish(change)
    assert drain(watcher) == [STOPPING, STEP, STOPPED]
    assert len(wakes) == 3


def test_watching_during_a_publish() -> None:
    """Subscribing while a change is being told (from another watcher's wake): that change
    is the snapshot and is not told again; the next one is the first after it."""
    changes = Changes()
    joined: list[Watcher] = []
    changes.watch(lambda: joined.append(changes.watch(lambda: None)) if not joined else None)
    changes.publish(RUNNING)
    changes.publish(STOPPING)
    assert joined[0].snapshot == RUNNING
    assert drain(joined[0]) == [STOPPING]


def test_cap() -> None:
    changes = Changes(max_watchers=2)
    first = changes.watch(lambda: None)
    changes.watch(lambda: None)
    with pytest.raises(TooManyWatchersError, match="too many watchers"):
        changes.watch(lambda: None)
    first.close()
    changes.watch(lambda: None)


def test_slow_watcher_is_dropped_alone() -> None:
    """Past the backlog bound a watcher is dropped and its slot freed; a reader keeps all."""
    changes = Changes(backlog=3)
    slow_wakes: list[bool] = []
    slow = changes.watch(lambda: slow_wakes.append(slow.dropped))
    got: list[Change] = []
    fast: list[Watcher] = []
    fast.append(changes.watch(lambda: got.extend(drain(fast[0]))))
    for n in range(10):
        changes.publish(Change(VMState.RUNNING, str(n)))
    assert slow.dropped and slow.take() is None
    assert slow_wakes == [False, False, False, True]  # told once more, that it is dropped
    assert [c.message for c in got] == [str(n) for n in range(10)]
    assert len(changes) == 1


def test_failing_wake_drops_only_its_watcher() -> None:
    changes = Changes()

    def broken() -> None:
        raise RuntimeError("boom")

    bad = changes.watch(broken)
    good = changes.watch(lambda: None)
    changes.publish(RUNNING)
    changes.publish(STOPPED)
    assert bad.dropped and len(changes) == 1
    assert drain(good) == [RUNNING, STOPPED]


# -- the wire, against the server with a stand-in controller ---------------------------


async def watching(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(WATCH)
    return reader, writer


async def line(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(3):
        return await reader.readline()


async def test_watch_lines_in_order_then_eof(
    server: Server, sock_path: Path, controller: FakeController
) -> None:
    """Snapshot first, then one line per change with state, event and message, then EOF."""
    reader, writer = await watching(sock_path)
    assert await line(reader) == b'{"ok":true,"state":"running","vm_state":"running","pid":4242}\n'
    for change in (STOPPING, STEP, STOPPED):
        controller.changes.publish(change)
    assert await line(reader) == (
        b'{"ok":true,"state":"stopping","vm_state":"stopping","pid":4242,'
        b'"message":"stop requested, 30 s to finish"}\n'
    )
    assert await line(reader) == (
        b'{"ok":true,"state":"stopping","vm_state":"stopping","pid":4242,'
        b'"message":"stop: ACPI power-down (30.0 s for it)","event":"acpi-power-down"}\n'
    )
    assert await line(reader) == (
        b'{"ok":true,"state":"stopped","vm_state":"stopped","pid":4242,'
        b'"message":"stop requested"}\n'
    )
    assert await line(reader) == b""
    writer.close()
    assert len(controller.changes) == 0


async def test_watch_after_the_end_is_one_line(
    server: Server, sock_path: Path, controller: FakeController
) -> None:
    controller.changes.publish(STOPPED)
    reader, writer = await watching(sock_path)
    async with asyncio.timeout(3):
        assert await reader.read() == (
            b'{"ok":true,"state":"stopped","vm_state":"stopped","pid":4242,'
            b'"message":"stop requested"}\n'
        )
    writer.close()


async def test_too_many_watchers(
    server: Server, sock_path: Path, controller: FakeController
) -> None:
    """Past the cap: an error line and close; a watcher that leaves frees its slot at once."""
    controller.changes.max_watchers = 2
    first = await watching(sock_path)
    second = await watching(sock_path)
    for reader, _ in (first, second):
        assert b'"running"' in await line(reader)
    refused, writer = await watching(sock_path)
    async with asyncio.timeout(3):
        assert await refused.read() == b'{"ok":false,"error":"too many watchers"}\n'
    writer.close()
    first[1].close()
    async with asyncio.timeout(3):
        while len(controller.changes) > 1:
            await asyncio.sleep(0.01)
    third, writer = await watching(sock_path)
    assert b'"running"' in await line(third)
    for w in (second[1], writer):
        w.close()


async def test_watcher_that_never_reads_is_dropped_alone(
    server: Server, sock_path: Path, controller: FakeController
) -> None:
    """A watcher that never reads is dropped once its backlog overflows; a reading one
    gets every change in order, and a plain status client is answered all along."""
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    deaf.connect(str(sock_path))
    deaf.sendall(WATCH)
    reader, writer = await watching(sock_path)
    await line(reader)
    async with asyncio.timeout(3):
        while len(controller.changes) < 2:
            await asyncio.sleep(0.01)
    got: list[bytes] = []
    for n in range(2000):
        controller.changes.publish(Change(VMState.RUNNING, f"change {n}"))
        if n % 10 == 9:  # the good watcher reads as it comes: never 10 changes behind
            while len(got) <= n:
                got.append(await line(reader))
        if n % 100 == 0:
            assert await ask(sock_path) == STATUS
    assert len(controller.changes) == 1, "the deaf watcher is still subscribed"
    assert [msgspec.json.decode(g)["message"] for g in got] == [f"change {n}" for n in range(2000)]
    deaf.settimeout(3)
    with deaf.makefile("rb") as unread:  # what the kernel held, then the end
        kept = [msgspec.json.decode(g)["message"] for g in unread.readlines()[1:]]
    print(f"the deaf watcher was sent {len(kept)} lines before it was dropped")
    assert kept == [f"change {n}" for n in range(len(kept))]
    assert len(kept) < 100  # the kernel holds a few dozen (a small SO_SNDBUF), not 200 KiB
    deaf.close()
    writer.close()


async def test_reload_drain_ends_a_watch(
    server: Server, sock_path: Path, controller: FakeController
) -> None:
    """A reload's drain ends a watch with its last line and EOF; the watcher's slot is freed."""
    reader, writer = await watching(sock_path)
    assert b'"running"' in await line(reader)
    await server.drain(1.0, "vmhost reloaded")
    assert await line(reader) == b'{"ok":true,"message":"vmhost reloaded"}\n'
    assert await line(reader) == b""
    writer.close()
    async with asyncio.timeout(3):
        while len(controller.changes):
            await asyncio.sleep(0.01)
    await server.resume()


async def test_async_client_watch(
    server: Server, sock_path: Path, controller: FakeController
) -> None:
    """AsyncClient.watch yields every line, in order, and ends with the VM."""
    early = AsyncClient(sock_path).watch()
    assert (await anext(early)).vm_state == "running"
    seen: list[str] = []

    async def consume() -> None:
        async for response in AsyncClient(sock_path).watch():
            seen.append(response.vm_state)
            if len(seen) == 1:
                controller.changes.publish(STOPPING)
                controller.changes.publish(STOPPED)

    await asyncio.wait_for(consume(), 3)
    assert seen == ["running", "stopping", "stopped"]
    assert (await anext(early)).vm_state == "stopping"
    assert (await anext(early)).vm_state == "stopped"
    with pytest.raises(StopAsyncIteration):
        await anext(early)


async def test_watch_cut_short_is_an_error(
    sock_path: Path, controller: FakeController, capsys: pytest.CaptureFixture[str]
) -> None:
    """vmhost gone before the VM ended: `vmhostctl events` exits 1 and says why."""
    async with Server(controller, sock_path):
        events = asyncio.create_task(
            asyncio.to_thread(vmhostctl_main, ["events", "--socket", str(sock_path)])
        )
        async with asyncio.timeout(3):
            while not len(controller.changes):
                await asyncio.sleep(0.01)
    assert await asyncio.wait_for(events, 3) == 1
    out, err = capsys.readouterr()
    assert out.endswith(" running\n")
    assert "watch ended before the VM did" in err
