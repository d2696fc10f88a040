"""Live migration's two ends, over QMP: the source sends the guest (``migrate``), the target
listens for it (QEMU under ``-incoming defer``, then ``migrate-incoming``).  Both follow
QEMU's MIGRATION events; the source also asks ``query-migrate`` how much is sent."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Final

from qemu.qmp import QMPError

from ..config import MigrationConfig
from ..errors import MigrationError
from .qmp import QmpSession

log = logging.getLogger(__name__)

PROGRESS_EVERY: Final = 0.5
"""Seconds between the source's progress reports (``watch`` events ``migration``)."""
CANCEL_TIMEOUT: Final = 10.0
FIGURES_TRIES: Final = 50
_ENDS: Final = frozenset({"completed", "failed", "cancelled"})
_STREAMING: Final = frozenset({"active", *_ENDS})
"""The target's statuses once the source's stream has begun."""
_HOST: Final = re.compile(r"[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]")
_EVENTS: Final = {"capabilities": [{"capability": "events", "state": True}]}


def tcp_uri(address: str, port: int) -> str:
    """QEMU's ``tcp:`` URI; an IPv6 address goes in brackets."""
    host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
    return f"tcp:{host}:{port}"


def listen_uri(config: MigrationConfig) -> str:
    return tcp_uri(config.listen_address, config.port)


def check_uri(uri: str) -> str:
    """Why ``uri`` cannot be a migration's target ("" if it can): only ``tcp:HOST:PORT``,
    never QEMU's ``exec:`` or ``fd:``, which would run or reach anything as QEMU."""
    host, _, port = uri.removeprefix("tcp:").rpartition(":")
    if not uri.startswith("tcp:") or not _HOST.fullmatch(host) or not port.isdigit():
        return f"not a tcp:HOST:PORT URI: {uri!r}"
    return ""


class Migration:
    """One VM's migration, either end: the status QEMU's MIGRATION events last said."""

    def __init__(self, qmp: QmpSession, config: MigrationConfig) -> None:
        self._qmp = qmp
        self.config = config
        self.status = ""
        """QEMU's word: setup, active, device, completed, failed, cancelling, cancelled."""
        self.failure = ""
        """Why the migration failed, as QEMU or the deadline said."""
        self.downtime_ms = 0
        self.target = ""
        """Where the guest was sent (the URI)."""
        self._changed = asyncio.Event()
        self._asked = asyncio.Event()
        """Set once QEMU took the ``migrate`` command (or refused it): a cancel before that
        would find nothing to cancel."""

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def left(self) -> bool:
        """The guest was sent away from here (not: it arrived here)."""
        return self.completed and bool(self.target)

    def event(self, data: Mapping[str, Any]) -> None:
        """A MIGRATION event (the controller forwards them)."""
        self.status = str(data.get("status", ""))
        self._changed.set()

    async def send(self, uri: str, on_progress: Callable[[str], None]) -> None:
        """Send the guest to ``uri``; returns once QEMU has completed (the guest runs on the
        target, a stopped copy is left here), else raises :class:`MigrationError` with the
        guest running here (a cancel, a failure, the deadline: then this cancels it)."""
        self.status, self.failure, self.target = "setup", "", uri
        bandwidth = self.config.max_bandwidth_mib * 2**20
        limits: dict[str, object] = {
            "downtime-limit": self.config.downtime_limit_ms,
            "max-bandwidth": bandwidth,
        }
        if self.config.tls_client_creds:
            limits["tls-creds"] = self.config.tls_client_creds
        try:
            await self._qmp.execute("migrate-set-capabilities", arguments=_EVENTS)
            await self._qmp.execute("migrate-set-parameters", arguments=limits)
            await self._qmp.execute("migrate", arguments={"uri": uri})
        except QMPError as e:
            self.status = "failed"
            raise self._failed(f"QEMU refused to migrate: {e}") from e
        finally:
            self._asked.set()
        deadline = time.monotonic() + self.config.timeout_seconds
        while not await self._until(_ENDS, min(PROGRESS_EVERY, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                await self.cancel()
                if self.completed:  # it made it after all
                    break
                raise self._failed(f"not done in {self.config.timeout_seconds} s: cancelled")
            on_progress(await self._progress())
        info = await self._query()
        for _ in range(FIGURES_TRIES):  # QEMU says "completed" before it has its figures
            if not self.completed or info.get("total-time"):
                break
            await asyncio.sleep(0.02)
            info = await self._query()
        self.downtime_ms = int(info.get("downtime", 0))
        if not self.completed:
            raise self._failed(str(info.get("error-desc") or f"migration {self.status}"))
        sent = int((info.get("ram") or {}).get("transferred", 0)) >> 20
        on_progress(
            f"migrated: {sent} MiB sent in {info.get('total-time', 0) / 1000:.2f} s,"
            f" downtime {self.downtime_ms} ms"
        )

    async def cancel(self) -> bool:
        """Cancel a migration under way; whether it had completed (the guest left) anyway."""
        if self.status in _ENDS or not self.status:
            return self.completed
        with contextlib.suppress(QMPError, TimeoutError):
            async with asyncio.timeout(CANCEL_TIMEOUT):
                await self._asked.wait()
            await self._qmp.execute("migrate_cancel")
            await self._until(_ENDS, CANCEL_TIMEOUT)
        return self.completed

    async def listen(self, uri: str) -> None:
        """The target's QEMU (``-incoming defer``) listens on ``uri`` from now on."""
        self.status = "setup"
        await self._qmp.execute("migrate-set-capabilities", arguments=_EVENTS)
        if self.config.tls_server_creds:
            tls = {"tls-creds": self.config.tls_server_creds}
            await self._qmp.execute("migrate-set-parameters", arguments=tls)
        await self._qmp.execute("migrate-incoming", arguments={"uri": uri})

    async def arrived(self) -> None:
        """Until the guest has arrived (QEMU runs it if it ran on the source); raises
        :class:`MigrationError` if it failed, if no stream began within the timeout, or if one
        that began is not done within the timeout and the time a cancel takes.  The source began
        later and gives up first, cancelling: its reason is the one an operator is told."""
        timeout = self.config.timeout_seconds
        if not await self._until(_STREAMING, timeout):
            raise self._failed(f"no guest arrived within {timeout} s")
        if not await self._until(_ENDS, timeout + CANCEL_TIMEOUT):
            raise self._failed(f"the guest did not arrive within {timeout} s of its start")
        if not self.completed:
            raise self._failed(f"the incoming migration {self.status}")

    async def _until(self, statuses: frozenset[str], timeout: float) -> bool:
        """Whether the status is one of ``statuses`` within ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(timeout, 0.0)):
                while self.status not in statuses:
                    self._changed.clear()
                    await self._changed.wait()
        return self.status in statuses

    async def _query(self) -> dict[str, Any]:
        with contextlib.suppress(QMPError, TimeoutError):
            info = await self._qmp.execute("query-migrate")
            if isinstance(info, dict):
                return info
        return {}

    async def _progress(self) -> str:
        ram = (await self._query()).get("ram") or {}
        total = int(ram.get("total", 0))
        sent = total - int(ram.get("remaining", total))  # re-sent dirty pages count once
        share = f"{100 * sent // total}%" if total else "?"
        return f"migrating: {share} of RAM sent ({sent >> 20} of {total >> 20} MiB)"

    def _failed(self, why: str) -> MigrationError:
        self.failure = why
        return MigrationError(why)
