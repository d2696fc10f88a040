"""QemuController against a real QEMU booting the real tiny guest (TCG)."""

# mypy: disable-error-code="comparison-overlap"
# (the state changes under mypy's feet: it is set by QEMU's events)

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Callable

import pytest
from conftest import VM
from guest.build import GuestImage

from vmhost import config as vmconfig
from vmhost.controller import PROBE_INTERVAL, PROBE_TIMEOUT, Ending, QemuController
from vmhost.errors import ControllerError, VMCrashedError
from vmhost.protocol import VMState

pytestmark = pytest.mark.slow


class Recorder:
    def __init__(self) -> None:
        self.states: list[VMState] = []

    def __call__(self, state: VMState, message: str, qmp_event: str) -> None:
        if not self.states or self.states[-1] is not state:
            self.states.append(state)


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


async def test_boot_states_info_and_ssh(make_vm: Callable[..., VM]) -> None:
    """starting → running once QMP says so; ssh_port forwards to the guest's port 22."""
    vm = make_vm()
    recorder = Recorder()
    controller = QemuController(
        vmconfig.load(vm.config), name="t", state_dir=vm.dir, on_state=recorder
    )
    assert controller.state is VMState.STARTING
    try:
        await controller.start()
        assert controller.state is VMState.RUNNING
        assert controller.ssh_port == vm.ssh_port and controller.backend == "qemu"
        assert controller.pid > 0
        await vm.wait_for_console("TINYGUEST READY")
        reader, writer = await asyncio.open_connection("127.0.0.1", vm.ssh_port)
        assert (await reader.readline()).startswith(b"SSH-2.0-tinyguest")
        writer.close()
    finally:
        await controller.close()
    assert recorder.states[0] is VMState.RUNNING


async def test_acpi_stop_keeps_data(booted: tuple[VM, QemuController]) -> None:
    """stop powers the guest off through ACPI; its marker is on disk and the fs is clean."""
    vm, controller = booted
    start = time.monotonic()
    await controller.stop(10)
    assert time.monotonic() - start < 5
    assert controller.state is VMState.STOPPED and controller.ending is Ending.REQUESTED
    await controller.wait()
    assert vm.marker() == vm.token and vm.clean()


async def test_deaf_guest_escalates_within_deadline(
    make_vm: Callable[..., VM], deaf_guest: GuestImage
) -> None:
    """A guest that ignores ACPI is ended by quit/signals, within the timeout plus a margin."""
    vm = make_vm(image=deaf_guest)
    controller = await started(vm)
    try:
        await vm.wait_for_console("TINYGUEST READY")
        start = time.monotonic()
        await controller.stop(2)
        elapsed = time.monotonic() - start
        assert 2 <= elapsed < 4.5
        assert controller.state is VMState.STOPPED
    finally:
        await controller.close()


async def test_second_stop_joins_the_first(booted: tuple[VM, QemuController]) -> None:
    """A second stop does not restart the clock; force_stop during a stop ends it at once."""
    _, controller = booted
    first = asyncio.ensure_future(controller.stop(30))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(controller.stop(30))
    start = time.monotonic()
    await controller.force_stop()
    assert time.monotonic() - start < 1
    await asyncio.gather(first, second)
    assert controller.ending is Ending.REQUESTED


async def test_force_stop_is_quick(booted: tuple[VM, QemuController]) -> None:
    """force_stop returns once QEMU is gone, well under a second."""
    _, controller = booted
    pid = controller.pid
    start = time.monotonic()
    await controller.force_stop()
    assert time.monotonic() - start < 0.5
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert controller.state is VMState.STOPPED


async def test_outside_sigkill_is_a_crash(booted: tuple[VM, QemuController]) -> None:
    """QEMU killed from outside → crashed within 1 s, and wait() raises."""
    _, controller = booted
    os.kill(controller.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(VMCrashedError, match="killed from outside by SIGKILL"):
        await controller.wait()
    assert time.monotonic() - start < 1
    assert controller.state is VMState.CRASHED


async def test_guest_poweroff_is_clean(make_vm: Callable[..., VM]) -> None:
    """A guest that powers itself off ends the VM as stopped, no error."""
    vm = make_vm(cmdline="guest.autopoweroff=1")
    controller = await started(vm)
    try:
        async with asyncio.timeout(60):
            await controller.wait()
    finally:
        await controller.close()
    assert controller.ending is Ending.POWEROFF and controller.state is VMState.STOPPED
    assert vm.marker() == vm.token


async def test_pause_and_resume_are_seen(booted: tuple[VM, QemuController]) -> None:
    """QMP STOP/RESUME events move the state to paused and back."""
    _, controller = booted
    await controller._qmp.execute("stop")
    await asyncio.sleep(0.2)
    assert controller.state is VMState.PAUSED
    await controller._qmp.execute("cont")
    await asyncio.sleep(0.2)
    assert controller.state is VMState.RUNNING


async def test_start_failure_names_the_cause(make_vm: Callable[..., VM]) -> None:
    """QEMU refusing its command line is an error carrying QEMU's own message."""
    vm = make_vm(toml='[qemu]\nextra_args = ["-no-such-flag"]')
    controller = QemuController(vmconfig.load(vm.config), name="t", state_dir=vm.dir)
    with pytest.raises(ControllerError, match="no-such-flag"):
        await controller.start()
    assert controller.state is VMState.ERROR
    await controller.close()


async def test_status_never_waits_on_a_hung_qemu(booted: tuple[VM, QemuController]) -> None:
    """A SIGSTOPped QEMU is reported unresponsive, and stop still ends it in time."""
    _, controller = booted
    os.kill(controller.pid, signal.SIGSTOP)
    try:
        async with asyncio.timeout(PROBE_INTERVAL + PROBE_TIMEOUT + 2):
            while controller.state is not VMState.UNRESPONSIVE:
                await asyncio.sleep(0.1)
        start = time.monotonic()
        await controller.stop(2)
        assert time.monotonic() - start < 4.5
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(controller.pid, signal.SIGCONT)


async def test_stop_through_the_guest_agent(make_vm: Callable[..., VM]) -> None:
    """With an agent configured, the guest is provisioned at boot and stopped by the agent."""
    from conftest import free_port

    vm = make_vm(toml=f'[agent]\nport = {free_port()}\nsecrets = {{ token = "s3cret" }}')
    controller = await started(vm)
    try:
        async with asyncio.timeout(60):
            while controller._agent is None:
                await asyncio.sleep(0.1)
        start = time.monotonic()
        await controller.stop(10)
        assert time.monotonic() - start < 5
        assert controller.ending is Ending.REQUESTED
    finally:
        await controller.close()
    assert vm.marker() == vm.token and vm.clean()
    assert vm.marker("/agent/secrets/token") == "s3cret"


async def test_stop_is_visible_at_once(booted: tuple[VM, QemuController]) -> None:
    """stop() marks the VM stopping on the call, so the next status already says so."""
    _, controller = booted
    gone = controller.stop(10)
    assert controller.state is VMState.STOPPING
    await gone
    assert controller.state is VMState.STOPPED
