"""QemuController against a real QEMU: the endings nobody asked for (a kill, a crash, a
signal, a start that fails) are told as what they are, and leave nothing behind."""

# mypy: disable-error-code="comparison-overlap"
# (the state changes under mypy's feet: it is set by QEMU's events)

from __future__ import annotations

import asyncio
import gc
import importlib.util
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import VM
from controlling import booted, started, until

from vmhost import config as vmconfig
from vmhost.errors import ControllerError, VMCrashedError
from vmhost.vm.controller import QemuController
from vmhost.vm.process import ExitCause
from vmhost.vm.state import VMState

__all__ = ["booted"]  # a fixture, used by name
pytestmark = pytest.mark.slow


async def test_outside_sigkill_is_a_crash(booted: tuple[VM, QemuController]) -> None:
    """QEMU killed from outside → crashed within 1 s, and wait() raises."""
    _, controller = booted
    os.kill(controller.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(VMCrashedError, match="killed from outside by SIGKILL"):
        await controller.wait()
    assert time.monotonic() - start < 10  # at once, by the pidfd: a wide guard
    assert controller.state is VMState.CRASHED


async def test_start_failure_names_the_cause(make_vm: Callable[..., VM]) -> None:
    """QEMU refusing its command line is an error carrying QEMU's own message."""
    vm = make_vm(toml='[qemu]\nextra_args = ["-no-such-flag"]')
    controller = QemuController(vmconfig.load(vm.config), name="t", state_dir=vm.dir)
    with pytest.raises(ControllerError, match="no-such-flag"):
        await controller.start()
    assert controller.state is VMState.ERROR
    await controller.close()


async def test_killed_while_starting_is_a_kill_not_a_start_failure(
    make_vm: Callable[..., VM],
) -> None:
    """QEMU killed from outside before QMP answers: killed from outside (exit 3), not
    "QEMU failed to start" (exit 4), which would blame the VM's config."""
    vm = make_vm()
    controller = QemuController(vmconfig.load(vm.config), name="t", state_dir=vm.dir)
    start = asyncio.ensure_future(controller.start())
    await asyncio.sleep(0)  # start() runs up to its QMP connect: QEMU is spawned, not answering
    assert controller.pid > 0 and controller.state is VMState.STARTING
    os.kill(controller.pid, signal.SIGKILL)
    try:
        with pytest.raises(VMCrashedError, match="killed from outside by SIGKILL"):
            await start
    finally:
        await controller.close()
    assert controller.ending is ExitCause.KILLED and controller.state is VMState.CRASHED


async def test_qemu_that_cannot_run_leaks_no_descriptor(
    make_vm: Callable[..., VM], tmp_path: Path
) -> None:
    """An executable QEMU that exec refuses (no #! line): a start error, no socket left open."""
    binary = tmp_path / "not-an-elf"
    binary.write_text("not a program\n")
    binary.chmod(0o755)
    vm = make_vm(toml=f'[qemu]\nbinary = "{binary}"')
    before = set(os.listdir("/proc/self/fd"))
    controller = QemuController(vmconfig.load(vm.config), name="t", state_dir=vm.dir)
    with pytest.raises(ControllerError, match="cannot run") as raised:
        await controller.start()
    await controller.close()
    # `raised` keeps start()'s frame alive: what it did not close is still open (not collected).
    assert set(os.listdir("/proc/self/fd")) <= before, raised.traceback
    assert controller.ending is ExitCause.START_FAILED


def _is_zombie(pid: int) -> bool:
    """QEMU has exited and nobody reaped it yet."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(") ")[2].startswith("Z")


async def test_poweroff_seen_in_one_loop_pass_with_the_exit_is_no_crash(
    make_vm: Callable[..., VM],
) -> None:
    """The loop held while the guest powers off (as a SIGSTOP of vmhost does): the pidfd and
    QMP's last bytes wake it in one pass, and the ending waits for QMP's SHUTDOWN event."""
    vm = make_vm(cmdline="guest.autopoweroff=1")
    controller = await started(vm)
    try:
        await vm.wait_for_console("TINYGUEST READY")
        deadline = time.monotonic() + 60
        while not _is_zombie(controller.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # noqa: ASYNC251 - holds the loop, as a stopped vmhost would
        assert _is_zombie(controller.pid), "the guest did not power off"
        async with asyncio.timeout(30):
            await controller.wait()
    finally:
        await controller.close()
    assert controller.ending is ExitCause.POWEROFF and controller.state is VMState.STOPPED


async def test_qemu_killed_by_a_realtime_signal_is_a_crash(
    booted: tuple[VM, QemuController],
) -> None:
    """Any signal number is reported (real-time ones have no name) and ends as crashed."""
    _, controller = booted
    os.kill(controller.pid, signal.SIGRTMIN + 1)
    with pytest.raises(VMCrashedError, match=f"by signal {signal.SIGRTMIN + 1}"):
        async with asyncio.timeout(30):
            await controller.wait()
    assert controller.state is VMState.CRASHED and controller.ending is ExitCause.KILLED


async def test_an_error_telling_how_qemu_ended_still_ends_the_vm(
    booted: tuple[VM, QemuController], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No exception on the exit path leaves the state undecided: the VM ends as crashed."""
    _, controller = booted

    def broken(*_: object) -> None:
        raise RuntimeError("planted")

    monkeypatch.setattr("vmhost.vm.controller.classify", broken)
    os.kill(controller.pid, signal.SIGKILL)
    with pytest.raises(VMCrashedError, match="exit code -9"):
        async with asyncio.timeout(30):
            await controller.wait()
    assert controller.state is VMState.CRASHED


async def test_a_start_failure_that_is_no_oserror_fails_at_once_and_leaks_nothing(
    make_vm: Callable[..., VM], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The slirp guard missing (raised while QEMU's environment is built): a start error
    with the reason, the VM in error, and close() returns with no descriptor left open."""
    vm = make_vm()
    find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if "_slirp_guard" in name else find(name, *a),
    )
    before = set(os.listdir("/proc/self/fd"))
    controller = QemuController(vmconfig.load(vm.config), name="t", state_dir=vm.dir)
    with pytest.raises(ControllerError, match=r"slirp guard .* is missing") as raised:
        async with asyncio.timeout(10):
            await controller.start()
    async with asyncio.timeout(10):
        await controller.close()
    assert set(os.listdir("/proc/self/fd")) <= before, raised.traceback
    assert controller.ending is ExitCause.START_FAILED and controller.state is VMState.ERROR


@pytest.mark.parametrize("how", ["stop", "poweroff", "reset then stop"])
async def test_an_ending_leaves_no_unretrieved_exception(
    make_vm: Callable[..., VM], how: str
) -> None:
    """QEMU's end and close() leave nothing for asyncio to report (an EOFError traceback)."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        vm = make_vm(cmdline="guest.autopoweroff=1" if how == "poweroff" else "")
        controller = await started(vm)
        try:
            if how == "poweroff":
                async with asyncio.timeout(60):
                    await controller.wait()
            else:
                await vm.wait_for_console("TINYGUEST READY")
                if how == "reset then stop":
                    await controller._qmp.execute("system_reset")
                    await until(
                        lambda: vm.console.read_text(errors="replace").count("TINYGUEST READY") > 1,
                        "the guest booted again",
                    )
                await controller.stop(30)
            await asyncio.sleep(0)  # the service closes a few passes later: the disconnect began
        finally:
            await controller.close()
        assert controller.state is VMState.STOPPED
        del controller
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert reported == []
