"""The VM's state, the one place it changes (:class:`RunState`), and the feed of its
changes, which watchers follow in order."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import deque
from collections.abc import Callable
from typing import Final, NamedTuple

from ..errors import TooManyWatchersError, TransitionError

log = logging.getLogger(__name__)

MAX_WATCHERS: Final = 128
WATCH_BACKLOG: Final = 32


class VMState(enum.Enum):
    """The VM's lifecycle state; ``wire`` is the Go daemon's coarser word for it."""

    STARTING = "starting"
    INCOMING = "incoming"
    """A live migration's target: QEMU waits for the guest to arrive."""
    BOOTING = "booting"
    """QEMU runs the guest, which is not ready yet (``[boot] ready``)."""
    RUNNING = "running"
    PAUSED = "paused"
    UNRESPONSIVE = "unresponsive"
    MIGRATING = "migrating"
    """A live migration's source: the guest still runs here while its memory is sent."""
    STOPPING = "stopping"
    STOPPED = "stopped"
    MIGRATED = "migrated"
    """The guest runs on another host now; nothing of it is left here."""
    CRASHED = "crashed"
    ERROR = "error"

    @property
    def wire(self) -> str:
        return _WIRE[self]

    @property
    def ended(self) -> bool:
        return self in (VMState.STOPPED, VMState.MIGRATED, VMState.CRASHED, VMState.ERROR)


_WIRE: Final = {
    VMState.STARTING: "running",
    VMState.INCOMING: "running",
    VMState.MIGRATING: "running",
    VMState.MIGRATED: "stopped",
    VMState.BOOTING: "running",
    VMState.RUNNING: "running",
    VMState.PAUSED: "running",
    VMState.UNRESPONSIVE: "running",
    VMState.STOPPING: "stopping",
    VMState.STOPPED: "stopped",
    VMState.CRASHED: "error",
    VMState.ERROR: "error",
}


_NEXT: Final = {
    VMState.STARTING: frozenset(
        {
            VMState.INCOMING,
            VMState.BOOTING,
            VMState.RUNNING,
            VMState.PAUSED,
            VMState.STOPPING,
            VMState.CRASHED,
            VMState.ERROR,
        }
    ),
    # The guest arrived (and runs, or was paused on the source), or never will.
    VMState.INCOMING: frozenset(
        {VMState.RUNNING, VMState.PAUSED, VMState.STOPPING, VMState.CRASHED, VMState.ERROR}
    ),
    # BOOTING and RUNNING go both ways: the guest got ready ([boot] ready), or was reset.
    **{
        live: frozenset(
            {
                VMState.BOOTING,
                VMState.RUNNING,
                VMState.PAUSED,
                VMState.UNRESPONSIVE,
                VMState.MIGRATING,
                VMState.STOPPING,
                VMState.STOPPED,
                VMState.CRASHED,
            }
        )
        - {live}
        for live in (VMState.BOOTING, VMState.RUNNING, VMState.PAUSED, VMState.UNRESPONSIVE)
    },
    # Back where it was when the migration fails; MIGRATED once QEMU is gone after it.
    VMState.MIGRATING: frozenset(
        {
            VMState.RUNNING,
            VMState.PAUSED,
            VMState.BOOTING,
            VMState.STOPPING,
            VMState.MIGRATED,
            VMState.CRASHED,
        }
    ),
    # Once a stop is asked, only its end; CRASHED if deciding how QEMU ended itself failed,
    # ERROR if it was the stop of a guest that never got ready; MIGRATED if the migration
    # the stop cancelled had already completed.
    VMState.STOPPING: frozenset(
        {VMState.STOPPED, VMState.MIGRATED, VMState.CRASHED, VMState.ERROR}
    ),
    VMState.STOPPED: frozenset(),
    VMState.MIGRATED: frozenset(),
    VMState.CRASHED: frozenset(),
    VMState.ERROR: frozenset(),
}
"""Where each state may go: everything else is refused."""


class RunState:
    """Where the VM is in its life, changed only through :meth:`move` (after qemu.qmp's
    ``Runstate``): an impossible move raises, so no mix of flags can say two things."""

    def __init__(self, initial: VMState = VMState.STARTING) -> None:
        self._state = initial
        self._changed = asyncio.Event()
        self._ended = asyncio.Event()
        if initial.ended:
            self._ended.set()

    @property
    def state(self) -> VMState:
        return self._state

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    def can_move(self, to: VMState) -> bool:
        return to in _NEXT[self._state]

    def move(self, to: VMState) -> None:
        if not self.can_move(to):
            raise TransitionError(f"the VM cannot go from {self._state.value} to {to.value}")
        self._state = to
        self._changed.set()
        self._changed = asyncio.Event()
        if to.ended:
            self._ended.set()

    async def changed(self) -> VMState:
        """The state after the next move."""
        await self._changed.wait()
        return self._state

    async def end(self, within: float | None = None) -> None:
        """Until the VM has ended (the ending decided, not only QEMU gone), or ``within``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._ended.wait()


class Change(NamedTuple):
    """One thing a watcher is told: the state after it, why, and the journal's text for it."""

    state: VMState
    message: str = ""
    event: str = ""
    """The QMP event behind it, or the stop chain's step (``acpi-power-down``, ``sigterm``)."""


class Changes:
    """A VM's changes, fanned out in order to at most ``max_watchers`` :class:`Watcher`.

    ``publish`` never waits for anyone: a watcher that falls ``backlog`` changes
    behind is dropped, so a slow one costs bounded memory and delays no other.
    """

    def __init__(self, *, max_watchers: int = MAX_WATCHERS, backlog: int = WATCH_BACKLOG) -> None:
        self.last = Change(VMState.STARTING)
        self.max_watchers = max_watchers
        self.backlog = backlog
        self._watchers: dict[Watcher, None] = {}

    def __len__(self) -> int:
        return len(self._watchers)

    def watch(self, wake: Callable[[], None]) -> Watcher:
        """Subscribe: the state now, then every change after it (``wake`` says one is there).

        Synchronous, so no change can fall between the snapshot and the subscription.
        """
        if len(self._watchers) >= self.max_watchers:
            raise TooManyWatchersError("too many watchers")
        watcher = Watcher(self, wake)
        self._watchers[watcher] = None
        return watcher

    def publish(self, change: Change) -> None:
        self.last = change
        for watcher in list(self._watchers):
            watcher.push(change)

    def forget(self, watcher: Watcher) -> None:
        self._watchers.pop(watcher, None)


class Watcher:
    """One subscriber: ``snapshot``, then the changes ``take`` hands out in order.

    Past the backlog bound it is unsubscribed and ``dropped`` (``wake`` is called
    once more to say so); a ``wake`` that fails drops only its own watcher.
    """

    __slots__ = ("_changes", "_pending", "_wake", "dropped", "snapshot")

    def __init__(self, changes: Changes, wake: Callable[[], None]) -> None:
        self._changes = changes
        self._wake = wake
        self._pending: deque[Change] = deque()
        self.snapshot = changes.last
        self.dropped = False

    def take(self) -> Change | None:
        return self._pending.popleft() if self._pending else None

    def close(self) -> None:
        self._pending.clear()
        self._changes.forget(self)

    def push(self, change: Change) -> None:
        self._pending.append(change)
        if len(self._pending) > self._changes.backlog:
            self.dropped = True
            self.close()
        try:
            self._wake()
        except Exception:
            log.exception("watcher failed; dropped")
            self.dropped = True
            self.close()
