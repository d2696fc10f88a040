"""QemuController against a real QEMU booting the real tiny guest (TCG): start, state and
info, the stop chain (agent, ACPI, force), pauses, and what a stop asked twice or clamped does."""

# mypy: disable-error-code="comparison-overlap"
# (the state changes under mypy's feet: it is set by QEMU's events)

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable

import pytest
from conftest import VM, free_port
from controlling import Recorder, booted, started, until
from guest.build import GuestImage

from vmhost import config as vmconfig
from vmhost.vm.controller import PROBE_INTERVAL, PROBE_TIMEOUT, QemuController
from vmhost.vm.process import ExitCause
from vmhost.vm.state import VMState
from vmhost.vm.stopchain import LAST_STEPS

__all__ = ["booted"]  # a fixture, used by name
pytestmark = pytest.mark.slow


async def test_boot_states_info_and_ssh(make_vm: Callable[..., VM]) -> None:
    """starting → running once QMP says so; ssh_port forwards to the guest's port 22;
    close() leaves no descriptor behind (QMP, console transport, stderr pipe)."""
    vm = make_vm()
    recorder = Recorder()
    before = set(os.listdir("/proc/self/fd"))
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
    assert set(os.listdir("/proc/self/fd")) <= before


async def test_acpi_stop_keeps_data(booted: tuple[VM, QemuController]) -> None:
    """stop powers the guest off through ACPI; its marker is on disk and the fs is clean."""
    vm, controller = booted
    start = time.monotonic()
    await controller.stop(10)
    assert time.monotonic() - start < 5
    assert controller.state is VMState.STOPPED and controller.ending is ExitCause.REQUESTED
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
        assert 2 <= elapsed < 2 + 2 * LAST_STEPS + 2  # the deadline, quit, SIGTERM, slack
        assert controller.state is VMState.STOPPED
    finally:
        await controller.close()


async def test_second_stop_joins_the_first(
    make_vm: Callable[..., VM], deaf_guest: GuestImage, caplog: pytest.LogCaptureFixture
) -> None:
    """A second stop keeps the first one's deadline and step; force_stop then ends it at once."""
    caplog.set_level(logging.INFO, "vmhost")
    vm = make_vm(image=deaf_guest)
    controller = await started(vm)
    try:
        await vm.wait_for_console("TINYGUEST READY")
        first = controller.stop(30)
        await until(lambda: controller.step == "ACPI power-down", "the first stop pressed ACPI")
        left = controller.stop_left()
        second = controller.stop(2)
        assert controller.stop_timeout == 30
        assert 25 < controller.stop_left() <= left, "the second stop moved the deadline"
        assert controller.step == "ACPI power-down" and controller.state is VMState.STOPPING
        start = time.monotonic()
        await controller.force_stop()
        assert time.monotonic() - start < 5
        await asyncio.gather(first, second)
        assert controller.ending is ExitCause.REQUESTED
        assert caplog.text.count("stop: ACPI power-down (") == 1
    finally:
        await controller.close()


async def test_force_stop_is_quick(booted: tuple[VM, QemuController]) -> None:
    """force_stop returns once QEMU is gone, well under a second."""
    _, controller = booted
    pid = controller.pid
    start = time.monotonic()
    await controller.force_stop()
    assert time.monotonic() - start < 5  # ~20 ms alone: a wide guard on 2 loaded cores
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert controller.state is VMState.STOPPED


async def test_guest_poweroff_is_clean(make_vm: Callable[..., VM]) -> None:
    """A guest that powers itself off ends the VM as stopped, no error."""
    vm = make_vm(cmdline="guest.autopoweroff=1")
    controller = await started(vm)
    try:
        async with asyncio.timeout(60):
            await controller.wait()
    finally:
        await controller.close()
    assert controller.ending is ExitCause.POWEROFF and controller.state is VMState.STOPPED
    assert vm.marker() == vm.token


async def test_pause_and_resume_are_seen(booted: tuple[VM, QemuController]) -> None:
    """QMP STOP/RESUME events move the state to paused and back."""
    _, controller = booted
    await controller._qmp.execute("stop")
    await until(lambda: controller.state is VMState.PAUSED, "paused after QMP stop")
    await controller._qmp.execute("cont")
    await until(lambda: controller.state is VMState.RUNNING, "running after QMP cont")


async def test_stop_of_a_paused_vm_resumes_it_first(booted: tuple[VM, QemuController]) -> None:
    """Paused vCPUs never see the power button: stop resumes them, then ACPI ends the guest
    cleanly well before the deadline (it used to press ACPI until the deadline, then quit)."""
    vm, controller = booted
    await controller._qmp.execute("stop")
    await until(lambda: controller.state is VMState.PAUSED, "paused after QMP stop")
    async with asyncio.timeout(15):  # the deadline is 30 s
        await controller.stop(30)
    assert controller.ending is ExitCause.REQUESTED
    assert vm.marker() == vm.token and vm.clean()


async def test_stop_of_a_vm_paused_on_a_disk_error_quits_at_once(
    make_vm: Callable[..., VM], caplog: pytest.LogCaptureFixture
) -> None:
    """A disk that fails with ENOSPC (a full host disk) pauses the VM (werror=enospc): stop
    says so and goes straight to quit, without waiting out its deadline."""
    caplog.set_level(logging.INFO, "vmhost")
    vm = make_vm()
    blkdebug = vm.dir / "blkdebug.conf"
    blkdebug.write_text('[inject-error]\nevent = "write_aio"\nerrno = "28"\n')
    drive = f"if=virtio,format=raw,file=blkdebug:{blkdebug}:{vm.disk}"
    toml = vm.config.read_text().replace(f'[[disks]]\npath = "{vm.disk}"\n', "")
    vm.config.write_text(f'{toml}\n[qemu]\nextra_args = ["-drive", "{drive}"]\n')
    controller = await started(vm)
    try:
        await until(lambda: controller.state is VMState.PAUSED, "paused by the disk error")
        status = await controller._qmp.execute("query-status")
        assert isinstance(status, dict) and status["status"] == "io-error"
        async with asyncio.timeout(10):  # the deadline is 30 s
            await controller.stop(30)
    finally:
        await controller.close()
    assert controller.ending is ExitCause.REQUESTED
    assert "paused on a disk I/O error" in caplog.text
    assert "stop: QMP quit (paused on a disk I/O error" in caplog.text
    assert "ACPI power-down" not in caplog.text


async def test_qmp_closing_during_a_stop_is_not_a_hang(
    make_vm: Callable[..., VM], deaf_guest: GuestImage
) -> None:
    """QMP closing while a stop runs is expected (QEMU on its way out): the VM stays
    stopping, never "unresponsive" (which the wire reports as running), until it is gone."""
    vm = make_vm(image=deaf_guest)
    recorder = Recorder()
    controller = await started(vm, recorder)
    try:
        await vm.wait_for_console("TINYGUEST READY")
        gone = controller.stop(3)
        await until(lambda: controller.step == "ACPI power-down", "ACPI pressed")
        await controller._qmp.disconnect()
        async with asyncio.timeout(30):
            await gone
    finally:
        await controller.close()
    assert recorder.states == [VMState.RUNNING, VMState.STOPPING, VMState.STOPPED]


async def test_status_never_waits_on_a_hung_qemu(booted: tuple[VM, QemuController]) -> None:
    """A SIGSTOPped QEMU is reported unresponsive, and stop still ends it in time."""
    _, controller = booted
    os.kill(controller.pid, signal.SIGSTOP)
    try:
        await until(
            lambda: controller.state is VMState.UNRESPONSIVE,
            "unresponsive",
            PROBE_INTERVAL + PROBE_TIMEOUT + 2,
        )
        start = time.monotonic()
        await controller.stop(2)
        assert time.monotonic() - start < 4.5
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(controller.pid, signal.SIGCONT)


async def test_stop_through_the_guest_agent(make_vm: Callable[..., VM]) -> None:
    """With an agent configured, the guest is provisioned at boot and stopped by the agent."""
    vm = make_vm(toml=f'[agent]\nport = {free_port()}\nsecrets = {{ token = "s3cret" }}')
    controller = await started(vm)
    try:
        await until(
            lambda: controller._connected_agent() is not None, "the guest agent provisioned"
        )
        start = time.monotonic()
        await controller.stop(10)
        assert time.monotonic() - start < 5
        assert controller.ending is ExitCause.REQUESTED
    finally:
        await controller.close()
    assert vm.marker() == vm.token and vm.clean()
    assert vm.marker("/agent/secrets/token") == "s3cret"


async def test_guest_reboot_is_provisioned_again(make_vm: Callable[..., VM]) -> None:
    """After a RESET the guest has forgotten its secrets: a new agent connection provisions
    it again, and the stop goes through that one (the guest then saves /run/agent to disk)."""
    vm = make_vm(toml=f'[agent]\nport = {free_port()}\nsecrets = {{ token = "s3cret" }}')
    controller = await started(vm)
    try:
        await until(
            lambda: controller._connected_agent() is not None, "the guest agent provisioned"
        )
        first = controller._connected_agent()
        await controller._qmp.execute("system_reset")
        await until(
            lambda: controller._connected_agent() not in (None, first),
            "provisioned again after the reset",
        )
        await controller.stop(30)
        assert controller.ending is ExitCause.REQUESTED
    finally:
        await controller.close()
    assert vm.marker("/agent/secrets/token") == "s3cret"


async def test_stop_is_visible_at_once(booted: tuple[VM, QemuController]) -> None:
    """stop() marks the VM stopping on the call, so the next status already says so."""
    _, controller = booted
    gone = controller.stop(10)
    assert controller.state is VMState.STOPPING
    await gone
    assert controller.state is VMState.STOPPED


async def test_stop_timeout_is_clamped(booted: tuple[VM, QemuController]) -> None:
    """A client's timeout beyond [stop] max_timeout_seconds (600 s by default) is clamped,
    and what the running chain may still take is what systemd is asked for."""
    _, controller = booted
    assert controller.stop_left() == 0
    told: list[float] = []
    controller.on_state = lambda state, message, event: told.append(controller.stop_left())
    gone = controller.stop(100_000)
    assert controller.stop_timeout == 600
    assert 598 < told[0] <= 602, "the state listener (systemd) was told less"
    assert 598 < controller.stop_left() <= 602
    await gone
    assert controller.stop_left() == 0


async def test_stop_without_a_timeout_takes_the_configs(make_vm: Callable[..., VM]) -> None:
    """stop() naming no timeout (the Go client's Stop(0), SIGTERM) gets [stop] timeout_seconds."""
    vm = make_vm(timeout=7)
    controller = await started(vm)
    try:
        gone = controller.stop()
        assert controller.stop_timeout == 7
        await gone
    finally:
        await controller.close()
    assert controller.ending is ExitCause.REQUESTED
