"""The VM's link to its guest agent: provisioned at boot and again after each reboot,
only reconnected after a reload; failing only means the stop chain has no agent step."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import AgentConfig
from ..errors import ControllerError
from .qmp import COMMAND_TIMEOUT

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger(__name__)


class AgentLink:
    """The connected agent, if any, and the one task that connects it."""

    def __init__(self, config: AgentConfig, socket: Path) -> None:
        self.config = config
        self.socket = socket
        self.on_done: Callable[[str], None] = lambda _: None
        """Told when a provisioning ends: the error, or "" (``[boot] ready = "agent"``)."""
        self.agent: Agent | None = None
        self._task: asyncio.Task[None] | None = None

    def prepare(self) -> None:
        """Before QEMU starts: a previous run's socket goes (QEMU binds it anew)."""
        self.socket.unlink(missing_ok=True)
        log.warning(
            "agent.port %d is not used: the agent is reached through %s, which only vmhost "
            "may open (no TCP forward that other users or guests could reach)",
            self.config.port,
            self.socket,
        )

    def start(self, *, reconnect: bool = False) -> None:
        """Provision the guest (or, ``reconnect``, only connect: it was provisioned)."""
        self._task = asyncio.create_task(self._connect(reconnect))

    def reprovision(self) -> None:
        """A rebooted guest forgot its keys, secrets and mounts, and its agent connection."""
        self._drop()
        self.start()

    async def close(self) -> None:
        task = self._task
        self._drop()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _drop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.agent is not None:
            self.agent.close()
            self.agent = None

    async def _connect(self, reconnect: bool) -> None:
        from .agent import Agent, provision  # most VMs have no agent: keep it off the start path

        address = str(self.socket)
        try:
            if reconnect:
                deadline = asyncio.get_running_loop().time() + COMMAND_TIMEOUT
                self.agent = await Agent.connect(address, deadline=deadline)
                log.info("guest agent reconnected (provisioned at the guest's boot)")
                return
            self.agent = await provision(self.config, address=address)
        except ControllerError as e:
            log.warning("guest agent unavailable, stop will use ACPI: %s", e)
            self.on_done(str(e))
            return
        log.info("guest agent connected and provisioned")
        self.on_done("")
