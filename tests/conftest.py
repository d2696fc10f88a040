"""Shared fixtures: a stand-in controller for server-layer tests, a live server on a socket."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from vmhost.protocol import VMState
from vmhost.server import Limits, Server


class FakeController:
    """A controller whose VM is a flag; for tests of the server layer only."""

    backend = "qemu"
    ssh_port = 2222
    pid = 4242

    def __init__(self) -> None:
        self.state = VMState.RUNNING
        self.stops: list[float] = []
        self.force_stops = 0
        self._ended = asyncio.Event()

    async def stop(self, timeout: float) -> None:
        self.stops.append(timeout)
        self.state = VMState.STOPPING

    async def force_stop(self) -> None:
        self.force_stops += 1
        self.state = VMState.STOPPED
        self._ended.set()

    async def wait(self) -> None:
        await self._ended.wait()


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "vmhost.sock"


@pytest.fixture
def controller() -> FakeController:
    return FakeController()


@pytest.fixture
async def server(sock_path: Path, controller: FakeController) -> AsyncIterator[Server]:
    limits = Limits(request_timeout=1.0, max_connections=300)
    async with Server(controller, sock_path, limits=limits) as srv:
        yield srv
