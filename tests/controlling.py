"""QemuController as its tests drive it: started on a VM's config, its state changes recorded,
and ``booted``, a controller whose guest is up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from conftest import VM

from vmhost import config as vmconfig
from vmhost.vm.controller import QemuController
from vmhost.vm.state import VMState


class Recorder:
    def __init__(self) -> None:
        self.states: list[VMState] = []

    def __call__(self, state: VMState, message: str, qmp_event: str) -> None:
        if not self.states or self.states[-1] is not state:
            self.states.append(state)


async def until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    """Wait for a condition the controller reaches by itself (a QMP event, a task)."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"not within {timeout:g} s: {what}") from None


async def started(vm: VM, recorder: Recorder | None = None) -> QemuController:
    controller = QemuController(
        vmconfig.load(vm.config), name="t", state_dir=vm.dir, on_state=recorder
    )
    await controller.start()
    return controller


@pytest.fixture
async def booted(make_vm: Callable[..., VM]) -> AsyncIterator[tuple[VM, QemuController]]:
    vm = make_vm()
    controller = await started(vm)
    await vm.wait_for_console("TINYGUEST READY")
    yield vm, controller
    await controller.close()
