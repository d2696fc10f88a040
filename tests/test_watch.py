"""`watch`: the controller's change fan-out, then the wire and the CLI against a real VM."""

from __future__ import annotations

import pytest

from vmhost.controller import Change, Changes, Watcher
from vmhost.errors import TooManyWatchersError
from vmhost.protocol import VMState

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
