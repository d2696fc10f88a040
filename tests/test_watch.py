"""`watch`: the controller's change fan-out, then the wire and the CLI against a real VM."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import msgspec
import pytest
from conftest import VM, FakeController
from fixtures import ENV, Vmhost, vmhost_factory, wait_for
from guest.build import GuestImage
from test_server import STATUS, ask

from vmhost.cli import vmhostctl_main
from vmhost.client import AsyncClient, Client
from vmhost.control.server import Server
from vmhost.control.wire import Response
from vmhost.errors import ClientError, TooManyWatchersError
from vmhost.vm import controller
from vmhost.vm.state import Change, Changes, VMState, Watcher

MARGIN: Final = 3.0
"""Scheduling slack on a shared 2-core machine running other QEMUs."""
CTL: Final = "import sys; from vmhost.cli import vmhostctl_main; sys.exit(vmhostctl_main())"

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

WATCH = b'{"method":"watch"}\n'


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


# -- against real `vmhost serve` and the real tiny guest ---------------------------------


@pytest.fixture
def vmhost_for() -> Iterator[Callable[[VM], Vmhost]]:
    yield from vmhost_factory()


def events(vm: Vmhost, *options: str) -> subprocess.Popen[str]:
    """``vmhostctl events`` on ``vm``'s socket, its lines readable as they come."""
    return subprocess.Popen(
        [sys.executable, "-c", CTL, "events", "--socket", str(vm.socket), *options],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class Watching:
    """``Client.watch()`` in a thread: what it has seen so far, and whether it ended."""

    def __init__(self, vm: Vmhost) -> None:
        self.seen: list[Response] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(Client(vm.socket),), daemon=True)
        self._thread.start()

    def _run(self, client: Client) -> None:
        try:
            for response in client.watch():
                self.seen.append(response)
        except BaseException as e:
            self.error = e

    def states(self) -> list[str]:
        return [r.vm_state for r in self.seen]

    def until(self, state: str, timeout: float) -> list[str]:
        wait_for(lambda: state in self.states()[1:] or self.error, timeout, f"a change to {state}")
        assert self.error is None, self.error
        return self.states()

    def ended(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


@pytest.mark.slow
def test_stop_seen_by_a_watcher_in_order(
    make_vm: Callable[..., VM], vmhost_for: Callable[[VM], Vmhost]
) -> None:
    """`vmhostctl events --json`: running, then stopping with the chain's step as an event,
    then stopped, then the end (exit 0), in that order; the human form says the same."""
    vm = vmhost_for(make_vm())
    vm.boot()
    human, machine = events(vm), events(vm, "--json")
    assert machine.stdout is not None and human.stdout is not None
    first = msgspec.json.decode(machine.stdout.readline())
    assert (first["vm_state"], first["pid"]) == ("running", vm.status().pid)
    assert " running" in human.stdout.readline()
    Client(vm.socket).stop(10)
    out, err = machine.communicate(timeout=30)
    assert machine.returncode == 0, err
    lines = [msgspec.json.decode(line) for line in out.splitlines()]
    assert [(r["vm_state"], r.get("event", "")) for r in lines] == [
        ("stopping", ""),
        ("stopping", "acpi-power-down"),
        ("stopped", ""),
    ]
    assert lines[0]["message"] == "stop requested, 10 s to finish"
    assert lines[1]["message"].startswith("stop: ACPI power-down (")
    assert lines[2]["message"] == "stop requested"
    assert vm.wait(30) == 0
    human_out = human.communicate(timeout=30)[0].splitlines()
    assert human.returncode == 0
    assert [line.split(" ", 2)[1] for line in human_out] == ["stopping", "stopping", "stopped"]
    assert "[acpi-power-down] stop: ACPI power-down (" in human_out[1]


@pytest.mark.slow
def test_deaf_guest_stop_steps_and_hang_seen(
    make_vm: Callable[..., VM], deaf_guest: GuestImage, vmhost_for: Callable[[VM], Vmhost]
) -> None:
    """QEMU SIGSTOPped: the watcher sees unresponsive, then running after SIGCONT; then a
    guest deaf to ACPI: every step of the chain it takes, in order, then stopped and EOF."""
    vm = vmhost_for(make_vm(image=deaf_guest))
    qemu_pid = vm.boot().pid
    watching = Watching(vm)
    wait_for(lambda: watching.seen, 10, "the snapshot")
    assert watching.states() == ["running"]
    limit = controller.PROBE_INTERVAL + controller.PROBE_TIMEOUT + MARGIN
    os.kill(qemu_pid, signal.SIGSTOP)
    try:
        assert watching.until("unresponsive", limit) == ["running", "unresponsive"]
    finally:
        os.kill(qemu_pid, signal.SIGCONT)
    assert watching.until("running", limit) == ["running", "unresponsive", "running"]
    assert watching.seen[1].message == f"QMP did not answer in {controller.PROBE_TIMEOUT:g} s"
    assert watching.seen[2].message == "QMP answers again"

    Client(vm.socket).stop(2)
    assert watching.ended(30)
    assert watching.error is None, watching.error
    tail = [(r.vm_state, r.event) for r in watching.seen[3:]]
    assert tail == [
        ("stopping", ""),
        ("stopping", "acpi-power-down"),
        ("stopping", "qmp-quit"),
        ("stopped", ""),
    ]
    assert vm.wait(30) == 0


GO_REQUESTS: Final = {
    b'{"method":"status"}\n': b'{"ok":true,"state":"running"}\n',
    b'{"method":"info"}\n': b'{"ok":true,"state":"running","ssh_port":%d,"backend":"qemu"}\n',
    b'{"method":"reboot"}\n': b'{"ok":false,"error":"unknown method: reboot"}\n',
}


def go_call(path: Path, request: bytes) -> bytes:
    """What the Go client does: dial, write one line, read one value, close."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        sock.sendall(request)
        with sock.makefile("rb") as reader:
            return reader.readline()


@pytest.mark.slow
def test_go_client_sees_nothing_new_with_watchers(
    make_vm: Callable[..., VM], vmhost_for: Callable[[VM], Vmhost]
) -> None:
    """With 100 watchers and one that never reads, a one-request-per-connection client gets
    the same bytes as without them, the Go server's; every watcher then sees the stop."""
    made = make_vm()
    vm = vmhost_for(made)
    vm.boot()
    expected = {k: v.replace(b"%d", str(made.ssh_port).encode()) for k, v in GO_REQUESTS.items()}
    alone = {request: go_call(vm.socket, request) for request in expected}
    assert alone == expected
    watchers = []
    for _ in range(100):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(vm.socket))
        sock.sendall(WATCH)
        watchers.append(sock.makefile("rb"))
        sock.close()  # the file keeps it open
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deaf.connect(str(vm.socket))
    deaf.sendall(WATCH)
    for reader in watchers:
        assert b'"vm_state":"running"' in reader.readline()
    for _ in range(20):
        assert {request: go_call(vm.socket, request) for request in expected} == expected
    assert go_call(vm.socket, b'{"method":"stop","timeout_seconds":10}\n') == (
        b'{"ok":true,"state":"stopping"}\n'
    )
    assert go_call(vm.socket, b'{"method":"status"}\n') == b'{"ok":true,"state":"stopping"}\n'
    for reader in watchers:
        ends = [msgspec.json.decode(line)["vm_state"] for line in reader.readlines()]
        assert ends[-1] == "stopped" and set(ends[:-1]) == {"stopping"}
        reader.close()
    deaf.close()
    assert vm.wait(30) == 0


@pytest.mark.slow
def test_reload_ends_a_watch_and_the_next_one_sees_the_vm(
    make_vm: Callable[..., VM], vmhost_for: Callable[[VM], Vmhost]
) -> None:
    """SIGHUP (reload): the watch gets `vmhost reloaded` and ends, cut short; a new watch
    on the reloaded vmhost starts from the adopted state (running), not `starting`."""
    vm = vmhost_for(make_vm())
    qemu_pid = vm.boot().pid
    before = Watching(vm)
    wait_for(lambda: before.seen, 10, "the snapshot")
    vm.signal(signal.SIGHUP)
    assert before.ended(30)
    assert [r.message for r in before.seen[1:]] == ["vmhost reloaded"]
    assert isinstance(before.error, ClientError) and "ended before the VM" in str(before.error)
    after = wait_for(lambda: _snapshot(vm), 30, "a watch on the reloaded vmhost")
    assert (after.vm_state, after.pid) == ("running", qemu_pid)
    assert after.message == "taken over by the reloaded vmhost"
    Client(vm.socket).stop(10)
    assert vm.wait(30) == 0


def _snapshot(vm: Vmhost) -> Response | None:
    try:
        return next(Client(vm.socket, deadline=2).watch())
    except ClientError:
        return None


@pytest.mark.slow
@pytest.mark.parametrize("asked", [["--timeout", "2"], []], ids=["timeout", "config"])
def test_vmhostctl_stop_prints_the_chain_as_it_goes(
    make_vm: Callable[..., VM],
    deaf_guest: GuestImage,
    vmhost_for: Callable[[VM], Vmhost],
    asked: list[str],
) -> None:
    """`vmhostctl stop` on a guest deaf to ACPI: each step on its own line, in order, and it
    returns once vmhost is gone; without --timeout the chain gets [stop] timeout_seconds."""
    vm = vmhost_for(make_vm(image=deaf_guest, timeout=2 if not asked else 10))
    vm.boot()
    label = str(vm.socket)
    out = subprocess.run(
        [sys.executable, "-c", CTL, "stop", "--socket", label, *asked],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert vm.wait(10) == 0
    lines = out.stdout.splitlines()
    assert lines[:2] == [
        f"{label}: stopping (stop timeout 2 s)",
        f"{label}: stopping (stop requested, 2 s to finish)",
    ]
    assert lines[2].startswith(f"{label}: stopping (stop: ACPI power-down (")
    assert lines[3].startswith(f"{label}: stopping (stop: QMP quit (")
    assert lines[4:] == [f"{label}: stopped (stop requested)"]
