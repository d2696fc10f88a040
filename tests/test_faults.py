"""QEMU faults, signals and data safety, with the real tiny guest under real ``vmhost serve``.

Each test starts ``vmhost serve`` as a subprocess, hurts it from outside the
way the world does (kill -9, SIGSTOP, a cut QMP socket, a guest that ignores
the power button, Ctrl-C, a second instance) and judges only what an operator
sees: the exit code, the time it took, the control socket's answers, the log,
and the guest's disk read back on the host.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import pytest
from conftest import VM, free_port
from fixtures import ENV, Vmhost, qemu_alive, wait_for
from guest.build import GuestImage

from vmhost.client import Client
from vmhost.service import (
    EXIT_ACTIVATION,
    EXIT_ALREADY_RUNNING,
    EXIT_CONFIG,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_START_FAILED,
    EXIT_USAGE,
    EXIT_VM_CRASHED,
)
from vmhost.vm import controller, stopchain

pytestmark = pytest.mark.slow

MakeVM = Callable[..., VM]
VmhostFor = Callable[[VM], Vmhost]

CHAIN_TAIL: Final = 2 * stopchain.LAST_STEPS
"""quit and SIGTERM each get this long after the stop deadline, by design."""
MARGIN: Final = 1.5
"""Scheduling slack on a shared 2-core machine running other QEMUs."""
STOPS_QUICK: Final = 5
STOPS_SOAK: Final = 50
_PIDFD_GETFD: Final = 438  # x86_64 syscall number


def exit_within(vm: Vmhost, limit: float) -> tuple[int, float]:
    """Wait for vmhost to exit; returns (exit code, seconds since the call)."""
    start = time.monotonic()
    code = vm.wait(limit + 30)
    elapsed = time.monotonic() - start
    assert elapsed <= limit, f"took {elapsed:.2f} s, limit {limit:g} s:\n{vm.output()}"
    return code, elapsed


def request_stop(vm: Vmhost, timeout: int) -> None:
    response = Client(vm.socket).stop(timeout)
    assert response.state == "stopping"


# -- QEMU faults ----------------------------------------------------------------


def test_sigkill_of_qemu_is_a_crash(make_vm: MakeVM, vmhost_for: VmhostFor) -> None:
    """QEMU killed with SIGKILL: vmhost reports it and exits 3 within 1 s."""
    vm = vmhost_for(make_vm())
    qemu_pid = vm.boot().pid
    os.kill(qemu_pid, signal.SIGKILL)
    code, elapsed = exit_within(vm, 10)  # at once by the pidfd (the bench times it)
    print(f"\nSIGKILL of QEMU -> exit {code} after {elapsed:.3f} s")
    assert code == EXIT_VM_CRASHED
    assert "crashed: QEMU killed from outside by SIGKILL" in vm.output()


def test_sigstop_of_qemu_status_answers_and_stop_ends_it(
    make_vm: MakeVM, vmhost_for: VmhostFor
) -> None:
    """A hung QEMU: status answers at once and says unresponsive; stop still ends it in time."""
    vm = vmhost_for(make_vm())
    qemu_pid = vm.boot().pid
    limit = controller.PROBE_INTERVAL + controller.PROBE_TIMEOUT + MARGIN
    os.kill(qemu_pid, signal.SIGSTOP)
    try:
        slowest = 0.0
        hung_at = time.monotonic()
        while True:
            start = time.monotonic()
            state = vm.status().vm_state
            slowest = max(slowest, time.monotonic() - start)
            if state == "unresponsive":
                print(f"\nSIGSTOP -> unresponsive after {time.monotonic() - hung_at:.2f} s", end="")
                break
            assert state == "running"
            assert time.monotonic() - hung_at < limit, "never reported unresponsive"
            time.sleep(0.05)
        # From the cache, never from the hung QEMU (which would take the probe's 2 s).
        assert slowest < 1, f"a status took {slowest * 1000:.0f} ms while QEMU hung"

        os.kill(qemu_pid, signal.SIGCONT)  # it recovers: so does the state
        wait_for(lambda: vm.status().vm_state == "running", limit, "running again")
        os.kill(qemu_pid, signal.SIGSTOP)
        wait_for(lambda: vm.status().vm_state == "unresponsive", limit, "unresponsive again")

        stop_timeout = 3
        request_stop(vm, stop_timeout)
        code, elapsed = exit_within(vm, stop_timeout + CHAIN_TAIL + MARGIN)
        print(
            f", slowest status {slowest * 1000:.1f} ms, stop({stop_timeout}) took {elapsed:.2f} s"
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(qemu_pid, signal.SIGCONT)
    assert code == EXIT_OK
    assert not qemu_alive(qemu_pid)
    assert "stop: SIGKILL" in vm.output()


def cut_qmp(qemu_pid: int) -> None:
    """Shut QEMU's own end of the QMP socket, taken from it with pidfd_getfd."""
    cmdline = Path(f"/proc/{qemu_pid}/cmdline").read_bytes().replace(b"\0", b" ")
    match = re.search(rb"id=qmp0,fd=(\d+)", cmdline)
    assert match, cmdline
    pidfd = os.pidfd_open(qemu_pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(_PIDFD_GETFD, pidfd, int(match[1]), 0)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
    finally:
        os.close(pidfd)
    with socket.socket(fileno=fd) as qmp:
        qmp.shutdown(socket.SHUT_RDWR)


def test_qmp_closed_by_qemu(make_vm: MakeVM, vmhost_for: VmhostFor) -> None:
    """QMP cut while QEMU runs: reported unresponsive at once, and stop ends it with signals."""
    vm = vmhost_for(make_vm())
    qemu_pid = vm.boot().pid
    cut_qmp(qemu_pid)
    wait_for(lambda: vm.status().vm_state == "unresponsive", 10, "unresponsive")
    assert qemu_alive(qemu_pid)
    request_stop(vm, 10)
    code, _ = exit_within(vm, CHAIN_TAIL + MARGIN)
    assert code == EXIT_OK
    assert "QMP connection to QEMU lost" in vm.output()


def test_guest_ignoring_acpi_is_escalated(
    make_vm: MakeVM, vmhost_for: VmhostFor, deaf_guest: GuestImage
) -> None:
    """A guest deaf to the power button is stopped by QMP quit once the timeout runs out."""
    vm = vmhost_for(make_vm(image=deaf_guest))
    vm.boot()
    stop_timeout = 3
    request_stop(vm, stop_timeout)
    wait_for(lambda: vm.status().vm_state == "stopping", 1.0, "stopping")
    code, elapsed = exit_within(vm, stop_timeout + CHAIN_TAIL + MARGIN)
    print(f"\ndeaf guest, stop({stop_timeout}) ended after {elapsed:.2f} s")
    assert code == EXIT_OK
    assert elapsed >= stop_timeout - 0.5, "ACPI was not given its time"
    assert "stop: QMP quit" in vm.output()


def test_guest_powering_off_ends_cleanly(make_vm: MakeVM, vmhost_for: VmhostFor) -> None:
    """A guest that powers itself off ends vmhost with 0, its data written and the disk clean."""
    vm = vmhost_for(make_vm(cmdline="guest.autopoweroff=1"))
    vm.boot()
    code, _ = exit_within(vm, 30)
    assert code == EXIT_OK
    assert "stopped: guest powered off" in vm.output()
    assert vm.vm.marker() == vm.vm.token
    assert vm.vm.clean()


def test_stop_through_the_agent_logs_no_loop_error(make_vm: MakeVM, vmhost_for: VmhostFor) -> None:
    """SIGTERM with an agent: the guest powers off on the agent's word and vmhost exits 0
    without an "exception was never retrieved" (QMP's disconnect cut half-way; found by the
    soak, in every such stop)."""
    vm = vmhost_for(make_vm(toml=f"[agent]\nport = {free_port()}"))
    vm.boot()
    vm.wait_console("TINYGUEST READY")
    wait_for(lambda: "guest agent connected" in vm.output(), 60, "the agent provisioned")
    vm.signal(signal.SIGTERM)
    code, _ = exit_within(vm, 10 + MARGIN)
    assert code == EXIT_OK
    assert "guest agent shutdown" in vm.output()
    assert "never retrieved" not in vm.output() and "Traceback" not in vm.output(), vm.output()


def test_guest_reboot_keeps_the_vm(make_vm: MakeVM, vmhost_for: VmhostFor) -> None:
    """A guest that reboots comes back in the same QEMU; vmhost keeps serving it."""
    vm = vmhost_for(make_vm(cmdline="guest.reboot_once=1"))
    vm.start()
    qemu_pid = vm.wait_running().pid
    vm.wait_console("TINYGUEST REBOOTING")
    vm.wait_console("TINYGUEST READY")
    status = vm.status()
    assert (status.vm_state, status.pid) == ("running", qemu_pid)
    assert "guest reset (reboot)" in vm.output()
    request_stop(vm, 10)
    code, _ = exit_within(vm, 10 + MARGIN)
    assert code == EXIT_OK
    assert vm.vm.marker().split() == [vm.vm.token] * 2


# -- bad disks: a clear error and no QEMU ------------------------------------------


def assert_no_qemu(vm: Vmhost) -> None:
    assert "starting QEMU" not in vm.output()
    assert not vm.vm.console.exists()


def test_missing_disk_is_a_config_error(make_vm: MakeVM, vmhost_for: VmhostFor) -> None:
    """A missing disk image fails with 78 (no restart helps) and names the field and file."""
    vm = vmhost_for(make_vm())
    vm.vm.disk.unlink()
    vm.start()
    code, _ = exit_within(vm, 10)
    assert code == EXIT_CONFIG
    assert f"disks[0].path: no such file or directory: {vm.vm.disk}" in vm.output()
    assert_no_qemu(vm)


@pytest.fixture
def immutable() -> Iterator[list[Path]]:
    """Files made immutable (read-only even for root); released at teardown."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def test_read_only_disk_is_a_config_error(
    make_vm: MakeVM, vmhost_for: VmhostFor, immutable: list[Path]
) -> None:
    """A disk that cannot be written (immutable, so even for root) fails with 78 before QEMU."""
    vm = vmhost_for(make_vm())
    if subprocess.run(["chattr", "+i", str(vm.vm.disk)], check=False).returncode:
        pytest.skip("chattr +i unsupported on this file system")
    immutable.append(vm.vm.disk)
    vm.start()
    code, _ = exit_within(vm, 10)
    assert code == EXIT_CONFIG
    assert "disks[0].path: not writable (or set read_only = true)" in vm.output()
    assert_no_qemu(vm)


def test_unusable_disk_is_a_start_failure(make_vm: MakeVM, vmhost_for: VmhostFor) -> None:
    """A disk QEMU refuses (raw bytes declared qcow2) exits 4 with QEMU's own reason."""
    vm = vmhost_for(make_vm())
    path = f'path = "{vm.vm.disk}"'
    config = vm.vm.config.read_text()
    vm.vm.config.write_text(config.replace(path, path + '\nformat = "qcow2"'))
    vm.start()
    code, _ = exit_within(vm, 15)
    assert code == EXIT_START_FAILED
    reason = vm.output().partition("QEMU failed to start")[2]
    assert "qcow2" in reason, vm.output()


def test_qemu_killed_while_starting_is_a_crash(make_vm: MakeVM, vmhost_for: VmhostFor) -> None:
    """QEMU killed from outside before QMP answers exits 3 (restarted), not 4 (its config)."""
    vm = vmhost_for(make_vm())
    binary = vm.vm.dir / "qemu-killed-at-once"
    binary.write_text("#!/bin/sh\nkill -KILL $$\n")
    binary.chmod(0o755)
    with vm.vm.config.open("a") as config:
        config.write(f'[qemu]\nbinary = "{binary}"\n')
    vm.start()
    code, _ = exit_within(vm, 15)
    assert code == EXIT_VM_CRASHED, vm.output()
    assert "QEMU killed from outside by SIGKILL" in vm.output()


def test_socket_path_too_long_is_not_restarted(make_vm: MakeVM, vmhost_for: VmhostFor) -> None:
    """A socket path beyond AF_UNIX's 107 bytes exits 64 (EX_USAGE, no restart), before QEMU."""
    vm = vmhost_for(make_vm())
    vm.socket = vm.vm.dir / ("s" * 120) / "vmhost.sock"
    vm.start()
    code, _ = exit_within(vm, 10)
    assert code == EXIT_USAGE, vm.output()
    assert "socket path longer than 107 bytes" in vm.output()
    assert_no_qemu(vm)


def test_activation_error_is_not_restarted(make_vm: MakeVM) -> None:
    """systemd passing a datagram socket (a broken socket unit) exits 6, no restart, no QEMU."""
    vm = make_vm()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram:
        fd = dgram.fileno()
        as_activated = (  # what systemd does: the socket as fd 3, LISTEN_PID its own pid
            f"import os, sys; os.dup2({fd}, 3); "
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1'); "
            "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
        )
        proc = subprocess.run(
            [sys.executable, "-c", as_activated, "-m", "vmhost", "serve", "t", *vm.args()],
            env=ENV,
            pass_fds=(fd,),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == EXIT_ACTIVATION, proc.stderr
    assert "socket activation:" in proc.stderr and "Traceback" not in proc.stderr
    assert not vm.console.exists()


def test_ctrl_c_before_the_handlers_ends_cleanly(make_vm: MakeVM, vmhost_for: VmhostFor) -> None:
    """Ctrl-C while vmhost still reads its config: exit 130, no traceback, no QEMU left."""
    vm = vmhost_for(make_vm())
    config = vm.vm.config.read_text()
    vm.vm.config.unlink()
    os.mkfifo(vm.vm.config)  # vmhost blocks opening it until we write: before any handler
    vm.start()

    def vmhost_reads() -> int | None:
        try:
            return os.open(vm.vm.config, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody has it open for reading yet
            return None

    fd = wait_for(vmhost_reads, 30, "vmhost opening its config")
    vm.signal(signal.SIGINT)
    try:
        os.write(fd, config.encode())
    finally:
        os.close(fd)
    code, _ = exit_within(vm, 30)
    assert code == EXIT_INTERRUPTED, vm.output()
    assert "Traceback" not in vm.output()
    for pid in vm.qemu_pids:
        assert not qemu_alive(pid)


# -- signals -------------------------------------------------------------------------


def test_sigterm_during_boot(make_vm: MakeVM, vmhost_for: VmhostFor) -> None:
    """SIGTERM while the guest boots: the stop chain runs to its end and exits 0."""
    stop_timeout = 3
    vm = vmhost_for(make_vm(timeout=stop_timeout))
    vm.start()
    qemu_pid = vm.wait_running().pid
    vm.signal(signal.SIGTERM)
    code, _ = exit_within(vm, stop_timeout + CHAIN_TAIL + MARGIN)
    assert code == EXIT_OK
    assert not qemu_alive(qemu_pid)
    output = vm.output()
    assert "SIGTERM received" in output and "stop: ACPI power-down" in output, output
    assert "stop: SIGKILL" not in output, "the chain did not end QEMU before its last step"


def test_sigterm_during_a_stop_keeps_its_deadline(
    make_vm: MakeVM, vmhost_for: VmhostFor, deaf_guest: GuestImage
) -> None:
    """SIGTERM in the middle of a stop joins it: no second chain, no new deadline, exit 0."""
    vm = vmhost_for(make_vm(image=deaf_guest, timeout=30))
    vm.boot()
    stop_timeout = 4
    started = time.monotonic()
    request_stop(vm, stop_timeout)
    wait_for(lambda: "stop: ACPI power-down" in vm.output(), 10, "the stop pressing ACPI")
    vm.signal(signal.SIGTERM)
    code, _ = exit_within(vm, stop_timeout + CHAIN_TAIL + MARGIN)
    assert code == EXIT_OK
    assert time.monotonic() - started >= stop_timeout - 0.5, "SIGTERM cut the stop short"
    assert vm.output().count("stop: ACPI power-down") == 1


def test_sigterm_twice(make_vm: MakeVM, vmhost_for: VmhostFor) -> None:
    """Two SIGTERMs in a row are one graceful stop: exit 0, the guest's disk clean."""
    vm = vmhost_for(make_vm())
    vm.boot()
    vm.signal(signal.SIGTERM)
    vm.signal(signal.SIGTERM)
    code, _ = exit_within(vm, 10)
    assert code == EXIT_OK
    assert vm.output().count("stop: ACPI power-down") == 1
    assert vm.vm.marker() == vm.vm.token
    assert vm.vm.clean()


def test_sigint_in_the_foreground(make_vm: MakeVM, vmhost_for: VmhostFor) -> None:
    """Ctrl-C (SIGINT to the whole foreground process group) stops the guest gracefully."""
    vm = vmhost_for(make_vm())
    vm.boot()
    os.killpg(vm.pid, signal.SIGINT)
    code, _ = exit_within(vm, 10)
    assert code == EXIT_OK
    assert "stopped: stop requested" in vm.output()
    assert vm.vm.marker() == vm.vm.token
    assert vm.vm.clean()


def test_second_sigint_forces(
    make_vm: MakeVM, vmhost_for: VmhostFor, deaf_guest: GuestImage
) -> None:
    """A second Ctrl-C while a graceful stop waits on a deaf guest kills it at once."""
    vm = vmhost_for(make_vm(image=deaf_guest, timeout=30))
    vm.boot()
    os.killpg(vm.pid, signal.SIGINT)
    wait_for(lambda: vm.status().vm_state == "stopping", 5, "stopping")
    os.killpg(vm.pid, signal.SIGINT)
    code, _ = exit_within(vm, 10)  # at once, not the 30 s deadline: a wide guard
    assert code == EXIT_OK


def test_serve_twice_refuses_and_leaves_the_first_alone(
    make_vm: MakeVM, vmhost_for: VmhostFor
) -> None:
    """A second ``vmhost serve`` of the same VM exits 5 with a clear message; the first runs on."""
    vm = make_vm()
    first = vmhost_for(vm)
    qemu_pid = first.boot().pid
    second = vmhost_for(vm)
    second.log = vm.dir / "second.log"
    second.start()
    code, _ = exit_within(second, 10)
    assert code == EXIT_ALREADY_RUNNING
    assert f"another vmhost is already serving {vm.socket}" in second.output()
    assert "starting QEMU" not in second.output()
    assert vm.socket.is_socket()
    status = first.status()
    assert (status.vm_state, status.pid) == ("running", qemu_pid)
    assert first.proc is not None and first.proc.poll() is None
    request_stop(first, 10)
    assert exit_within(first, 10 + MARGIN)[0] == EXIT_OK


def test_qemu_runs_sandboxed(make_vm: MakeVM, vmhost_for: VmhostFor) -> None:
    """QEMU runs under its seccomp sandbox (-sandbox on): the kernel reports filter mode 2."""
    vm = vmhost_for(make_vm())
    qemu_pid = vm.start().wait_running().pid
    status = Path(f"/proc/{qemu_pid}/status").read_text()
    assert re.search(r"^Seccomp:\s+2$", status, re.MULTILINE), status


# -- no data lost ----------------------------------------------------------------------


def graceful_stops(make_vm: MakeVM, vmhost_for: VmhostFor, count: int) -> None:
    """Boot, write a marker, stop (socket and SIGTERM alternately); every marker must survive."""
    vm = make_vm()
    tokens: list[str] = []
    for i in range(count):
        previous, vm.token = vm.token, f"stop-{i:03d}"
        vm.config.write_text(vm.config.read_text().replace(previous, vm.token))
        served = vmhost_for(vm)
        served.boot()
        tokens.append(vm.token)
        if i % 2:
            served.signal(signal.SIGTERM)
        else:
            request_stop(served, 10)
        code, _ = exit_within(served, 10 + MARGIN)
        assert code == EXIT_OK, served.output()
        assert vm.marker().split() == tokens, f"lost a marker at stop {i}"
        assert vm.clean(), f"disk left dirty by stop {i}"
    print(f"\ngraceful stops without loss: {len(tokens)} of {count}")


def test_graceful_stops_lose_nothing(make_vm: MakeVM, vmhost_for: VmhostFor) -> None:
    """Consecutive graceful stops of a guest that writes: each marker intact, the disk clean."""
    graceful_stops(make_vm, vmhost_for, STOPS_QUICK)


@pytest.mark.soak
def test_soak_graceful_stops_lose_nothing(make_vm: MakeVM, vmhost_for: VmhostFor) -> None:
    """50 consecutive graceful stops, each marker intact and the disk clean."""
    graceful_stops(make_vm, vmhost_for, STOPS_SOAK)
