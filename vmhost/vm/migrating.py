"""The controller's live-migration half (a base of :class:`~.controller.QemuController`):
the moves of the VM's run-state at either end of a migration; QMP's side of it is
:mod:`.migration`."""

from __future__ import annotations

import contextlib
import logging
import signal

from qemu.qmp import QMPError

from ..errors import MigrationError
from .migration import listen_uri
from .parts import EXIT_GRACE, Parts
from .state import Change, VMState

log = logging.getLogger(__name__)


class Migrating(Parts):
    """Both ends: :meth:`migrate` on the source, :meth:`_await_guest` on the target."""

    def migrate(self, uri: str) -> str:
        """Send the guest to the target listening at ``uri``: "" once begun, else why not.
        A stop meanwhile cancels it first; it ends with the VM ``migrated`` (vmhost exits),
        or back where it was, the guest running here."""
        state = self._run.state
        if state not in (VMState.RUNNING, VMState.PAUSED):
            return f"the VM is {state.value}: only a running or paused VM migrates"
        self._move(VMState.MIGRATING, f"migrating to {uri}", "migration")
        self._tasks.spawn(self._send(uri, state))
        return ""

    async def _send(self, uri: str, was: VMState) -> None:
        def progress(text: str) -> None:
            self.changes.publish(Change(VMState.MIGRATING, text, "migration"))

        try:
            await self.migration.send(uri, progress)
        except (MigrationError, QMPError, OSError, TimeoutError) as e:
            if self._run.state is VMState.MIGRATING:  # not when a stop cancelled it
                self._move(was, f"migration failed: {e}; the guest runs on here", "migration")
            return
        await self._leave()

    async def _stop_after_migration(self) -> None:
        """A stop during a migration: cancelled first; if the guest left anyway, nothing is
        left here to stop."""
        assert self._stop is not None
        await (self._leave() if await self.migration.cancel() else self._stop.run())

    async def _leave(self) -> None:
        """The guest runs on the target: end this stopped copy (vmhost ends ``migrated``)."""
        with contextlib.suppress(QMPError, OSError, TimeoutError):
            await self._qmp.execute("quit")
        if not await self._process.exiting(EXIT_GRACE):
            self._process.kill(signal.SIGKILL)

    def _await_guest(self) -> None:
        """The target's QEMU listens: the VM is ``incoming`` until the guest arrives."""
        uri = listen_uri(self.config.migration)
        self._move(VMState.INCOMING, f"QEMU waits for the guest on {uri}")
        self._tasks.spawn(self._receive())
        self._supervise()

    async def _receive(self) -> None:
        try:
            await self.migration.arrived()
            status = await self._qmp.execute("query-status")
        except (MigrationError, QMPError, OSError, TimeoutError) as e:
            log.error("no guest arrived: %s", e)
            self._process.kill(signal.SIGKILL)  # nothing of the guest ever ran here
            return
        paused = isinstance(status, dict) and status.get("status") != "running"
        self.readiness.adopt("arrived by live migration", -1)
        self._move(VMState.PAUSED if paused else VMState.RUNNING, "the guest arrived", "migration")
        if self._agent is not None:
            self._agent.start(reconnect=True)  # the guest was provisioned at its boot
