"""What the controller's halves share (:class:`~.migrating.Migrating`,
:class:`~.handover.Reloadable`): its parts, and the one place the VM's state moves."""

from __future__ import annotations

from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Final

from ..config import Config
from .migration import Migration
from .process import QemuProcess
from .provisioning import AgentLink
from .qmp import QmpSession
from .readiness import Readiness
from .state import Change, Changes, RunState, VMState
from .stopchain import StopChain
from .tasks import Background

if TYPE_CHECKING:
    from .agent import Agent

EXIT_GRACE: Final = 1.0
"""A wide guard: how long QEMU's streams may take to report its exit after the other did,
or QEMU to exit once asked to quit."""
StateListener = Callable[[VMState, str, str], None]
"""``(state, message, qmp_event)``: told of every state change, in order."""


class Parts:
    """The parts of one VM's controller; :class:`~.controller.QemuController` makes them."""

    config: Config
    on_state: StateListener | None
    changes: Changes
    readiness: Readiness
    migration: Migration
    _run: RunState
    _process: QemuProcess
    _qmp: QmpSession
    _stop: StopChain | None
    _agent: AgentLink | None
    _tasks: Background
    _console: IO[bytes] | None

    def _move(self, state: VMState, message: str, qmp_event: str = "") -> None:
        """The one place the VM's state changes (the run-state refuses impossible moves)."""
        self._run.move(state)
        if self.on_state is not None:
            self.on_state(state, message, qmp_event)
        self.changes.publish(Change(state, message, qmp_event))

    def _connected_agent(self) -> Agent | None:
        return self._agent.agent if self._agent is not None else None

    def _supervise(self, *, agent: bool = False, reconnect_agent: bool = False) -> None:
        """Watch QEMU from now on (QMP's loss, hang probes) and, with ``agent``, its agent."""
        raise NotImplementedError

    def _read_streams(self) -> None:
        """Read QEMU's stderr, console and the guest's notify port."""
        raise NotImplementedError
