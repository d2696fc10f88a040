"""Start, stop and footprint of real ``vmhost serve`` processes.

exec → READY=1 is timed with a notify socket we bind ourselves, so it is
what systemd would see: from the exec of the service to the datagram that
says READY=1 (QEMU runs; the guest's boot is not included).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import IO, Final

import msgspec
from qemu.qmp import QMPClient

from vmhost import config as vmconfig
from vmhost.vm import argv as qemu_argv

from . import proc
from .targets import (
    FORCE_STOP,
    REPO,
    STOPPING,
    Service,
    ask,
    blank_vm,
    environment,
    free_port,
    serve_argv,
)

READY_TIMEOUT: Final = 30.0
BOOT_TIMEOUT: Final = 120.0
GUEST_READY: Final = b"TINYGUEST READY"
GUEST_CACHE: Final = Path("/var/cache/vmhost-test/tinyguest")
"""Shared with the test suite's fixtures: a built guest is reused, not rebuilt."""


class StartStop(msgspec.Struct):
    """One service life: exec → READY=1, then force_stop → vmhost exited (seconds)."""

    exec_to_ready: float
    force_stop_to_gone: float
    qemu_gone_with_vmhost: bool


class StartPath(msgspec.Struct):
    """What exec → READY is made of (medians, seconds)."""

    interpreter: float
    """``python -c pass``: the interpreter alone, before any vmhost code."""
    imports: float
    """``python -c 'import vmhost.cli, vmhost.service'`` minus the interpreter."""
    finalization: float
    """What the interpreter's own exit costs once those modules are loaded (vs ``os._exit``)."""
    slowest_imports: list[str]
    """Top-level packages by their modules' own import time (``-X importtime``)."""
    runs: list[StartStop]


class GracefulStop(msgspec.Struct):
    """ACPI stop of a booted tiny guest (seconds, per run)."""

    through_vmhost: list[float]
    """``stop`` request sent → vmhost exited."""
    guest_alone: list[float]
    """QMP ``system_powerdown`` → QEMU exited, same QEMU command line, no vmhost."""
    overhead: float
    """Median through vmhost minus median guest alone: what vmhost adds."""


class FootprintStep(msgspec.Struct):
    vms: int
    rss_kib: int
    pss_kib: int
    uss_kib: int
    qemu_rss_kib: int


class Footprint(msgspec.Struct):
    """N idle VMs: memory of their vmhost processes (QEMU apart), and idle CPU."""

    steps: list[FootprintStep]
    pss_slope_kib: float
    """Added PSS per extra VM (least squares over the steps)."""
    pss_intercept_kib: float
    pss_for_100_kib: float
    idle_cpu_ms_per_s: float
    """CPU one idle vmhost uses per second of wall time (mean over the N)."""


_SERVICE_MODULES: Final = "import vmhost.cli, vmhost.service"


def _interpreter_time(code: str, runs: int = 5) -> float:
    """The fastest of ``runs``: other work on the machine only ever adds time."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, env=environment(), cwd=REPO)
        times.append(time.perf_counter() - started)
    return min(times)


def _exit_time(last: str, runs: int = 5) -> float:
    """From the last statement of a process with the service's modules loaded to its end."""
    code = f"{_SERVICE_MODULES}, os, time; print(time.monotonic_ns(), flush=True); {last}"
    times = []
    for _ in range(runs):
        child = subprocess.Popen(
            [sys.executable, "-c", code], env=environment(), cwd=REPO, stdout=subprocess.PIPE
        )
        assert child.stdout is not None
        stamp = int(child.stdout.readline())
        child.wait()
        times.append((time.monotonic_ns() - stamp) / 1e9)
    return min(times)


def _slowest_imports(count: int = 12, runs: int = 5) -> list[str]:
    """Own import time summed per top-level package, each module's fastest of ``runs``."""
    fastest: dict[str, int] = {}
    for _ in range(runs):
        report = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", _SERVICE_MODULES],
            check=True,
            env=environment(),
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stderr
        for line in report.splitlines()[1:]:
            own_text, _, name = line.removeprefix("import time:").split("|")
            module, own = name.strip(), int(own_text)
            fastest[module] = min(fastest.get(module, own), own)
    packages: dict[str, int] = {}
    for module, microseconds in fastest.items():
        top = module.split(".")[0].lstrip("_")
        packages[top] = packages.get(top, 0) + microseconds
    ranked = sorted(packages.items(), key=lambda item: -item[1])[:count]
    return [f"{name} {us / 1000:.1f} ms" for name, us in ranked]


def _notify_socket(path: Path) -> socket.socket:
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    return sock


def _wait_ready(notify: socket.socket, process: subprocess.Popen[bytes]) -> float:
    """Seconds on the perf_counter clock at which READY=1 arrived."""
    notify.settimeout(READY_TIMEOUT)
    while True:
        try:
            message = notify.recv(4096)
        except TimeoutError:
            raise RuntimeError(f"no READY=1 within {READY_TIMEOUT} s") from None
        if b"READY=1" in message.split(b"\n"):
            return time.perf_counter()
        if process.poll() is not None:
            raise RuntimeError(f"vmhost exited with {process.returncode} before READY=1")


def _qemu_pid(sock: Path) -> int:
    answer = ask(sock, b'{"method":"status","detail":true}\n')
    pid: int = msgspec.json.decode(answer).get("pid", 0)
    return pid


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def start_stop(workdir: Path, runs: int) -> StartPath:
    """exec → READY=1 and force_stop → gone, ``runs`` times, one fresh service each."""
    _interpreter_time(_SERVICE_MODULES, runs=1)  # writes the bytecode caches, warms the page cache
    interpreter = _interpreter_time("pass")
    loaded = _interpreter_time(_SERVICE_MODULES)
    finalization = _exit_time("") - _exit_time("os._exit(0)")
    results = []
    for i in range(runs):
        vmdir = workdir / f"start{i}"
        vmdir.mkdir(parents=True, exist_ok=True)
        config = blank_vm(vmdir, "start")
        sock = vmdir / "vmhost.sock"
        with _notify_socket(vmdir / "notify.sock") as notify:
            env = environment(NOTIFY_SOCKET=str(vmdir / "notify.sock"))
            started = time.perf_counter()
            process = subprocess.Popen(
                serve_argv("start", config, sock, vmdir / "state"),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=(vmdir / "vmhost.log").open("wb"),
            )
            try:
                ready = _wait_ready(notify, process)
                qemu_pid = _qemu_pid(sock)
                asked = time.perf_counter()
                if ask(sock, FORCE_STOP) != STOPPING:
                    raise RuntimeError("force_stop was not answered 'stopping'")
                process.wait(10)
                gone = time.perf_counter()
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        results.append(
            StartStop(
                exec_to_ready=ready - started,
                force_stop_to_gone=gone - asked,
                qemu_gone_with_vmhost=not _alive(qemu_pid),
            )
        )
    return StartPath(
        interpreter=interpreter,
        imports=loaded - interpreter,
        finalization=finalization,
        slowest_imports=_slowest_imports(),
        runs=results,
    )


def _guest_config(vmdir: Path, image_kernel: Path, image_initrd: Path, disk: Path) -> Path:
    path = vmdir / "guest.toml"
    path.write_text(
        "[machine]\n"
        'accel = "tcg"\n'
        "memory_mib = 256\n"
        "[boot]\n"
        f'kernel = "{image_kernel}"\n'
        f'initrd = "{image_initrd}"\n'
        'cmdline = "console=ttyS0 quiet panic=-1"\n'
        "[[disks]]\n"
        f'path = "{disk}"\n'
        "[network]\n"
        f"ssh_port = {free_port()}\n"
        "[stop]\n"
        "timeout_seconds = 30\n"
    )
    return path


def _wait_console(console: Path, process: subprocess.Popen[bytes]) -> None:
    def booted() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"vmhost exited with {process.returncode} during boot")
        with contextlib.suppress(FileNotFoundError):
            return GUEST_READY in console.read_bytes()
        return False

    proc.wait_for(booted, BOOT_TIMEOUT, "the guest to boot")


def _stop_through_vmhost(vmdir: Path, config: Path) -> float:
    sock = vmdir / "vmhost.sock"
    process = subprocess.Popen(
        serve_argv("guest", config, sock, vmdir / "state"),
        env=environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(vmdir / "vmhost.log").open("wb"),
    )
    try:
        _wait_console(vmdir / "state" / "console.log", process)
        asked = time.perf_counter()
        if ask(sock, b'{"method":"stop","timeout_seconds":30}\n') != STOPPING:
            raise RuntimeError("stop was not answered 'stopping'")
        code = process.wait(60)
        gone = time.perf_counter()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if code != 0:
        raise RuntimeError(f"vmhost exited with {code} after an ACPI stop")
    return gone - asked


def _stop_guest_alone(config_path: Path) -> float:
    """The same QEMU command line vmhost would run, driven by QMP directly."""
    config = vmconfig.load(config_path)
    qmp_parent, qmp_child = socket.socketpair()
    console_read, console_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    argv = qemu_argv.argv(
        config,
        name="bench-alone",
        qmp_fd=qmp_child.fileno(),
        console_fd=console_write,
        kvm=False,
    )
    process = subprocess.Popen(
        argv,
        pass_fds=(qmp_child.fileno(), console_write),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    qmp_child.close()
    os.close(console_write)
    try:
        return asyncio.run(_powerdown(process, qmp_parent, os.fdopen(console_read, "rb", 0)))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


async def _powerdown(
    process: subprocess.Popen[bytes], qmp_sock: socket.socket, console: IO[bytes]
) -> float:
    booted = asyncio.Event()

    async def drain_console() -> None:
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), console
        )
        seen = b""
        while chunk := await reader.read(65536):
            seen = (seen + chunk)[-4096:]
            if GUEST_READY in seen:
                booted.set()
        transport.close()

    qmp = QMPClient("bench")
    drain = asyncio.create_task(drain_console())
    try:
        await qmp.connect(qmp_sock)
        async with asyncio.timeout(BOOT_TIMEOUT):
            await booted.wait()
        asked = time.perf_counter()
        await qmp.execute("system_powerdown")
        await asyncio.to_thread(process.wait, 60)
        return time.perf_counter() - asked
    finally:
        drain.cancel()
        with contextlib.suppress(Exception):
            await qmp.disconnect()


def _guest_builder() -> ModuleType:
    """The test suite's tiny-guest builder (stdlib only), loaded from its file."""
    path = REPO / "tests" / "guest" / "build.py"
    spec = importlib.util.spec_from_file_location("tinyguest_build", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load the guest builder from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def graceful_stop(workdir: Path, runs: int) -> GracefulStop:
    """Boot the tiny guest and stop it by ACPI, through vmhost and alone, alternately."""
    builder = _guest_builder()
    image = builder.build(GUEST_CACHE)
    through, alone = [], []
    for i in range(runs):
        vmdir = workdir / f"guest{i}"
        vmdir.mkdir(parents=True, exist_ok=True)
        disk = builder.fresh_disk(image, vmdir / "disk.img")
        config = _guest_config(vmdir, image.kernel, image.initrd, disk)
        through.append(_stop_through_vmhost(vmdir, config))
        alone.append(_stop_guest_alone(config))
    return GracefulStop(
        through_vmhost=through,
        guest_alone=alone,
        overhead=proc.median(through) - proc.median(alone),
    )


def _fit(xs: list[int], ys: list[int]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return slope, my - slope * mx


def footprint(workdir: Path, count: int, idle_seconds: float = 5.0) -> Footprint:
    """Start ``count`` idle VMs one by one, measuring all vmhost processes after each."""
    services: list[Service] = []
    steps = []
    try:
        for i in range(count):
            service = Service(workdir / "fleet", f"vm{i:03d}", cpu=None)
            services.append(service)
            service.wait_serving()
            time.sleep(0.3)  # let start-up garbage settle
            memories = [proc.Memory(s.pid) for s in services]
            qemu_rss = sum(proc.rss_kib(_qemu_pid(s.sock)) for s in services)
            steps.append(
                FootprintStep(
                    vms=i + 1,
                    rss_kib=sum(m.rss for m in memories),
                    pss_kib=sum(m.pss for m in memories),
                    uss_kib=sum(m.uss for m in memories),
                    qemu_rss_kib=qemu_rss,
                )
            )
        before = [proc.cpu_seconds(s.pid) for s in services]
        time.sleep(idle_seconds)
        idle = [proc.cpu_seconds(s.pid) - b for s, b in zip(services, before, strict=True)]
    finally:
        for service in services:
            with contextlib.suppress(OSError):
                ask(service.sock, FORCE_STOP)
        for service in services:
            service.close()
    slope, intercept = _fit([s.vms for s in steps], [s.pss_kib for s in steps])
    return Footprint(
        steps=steps,
        pss_slope_kib=slope,
        pss_intercept_kib=intercept,
        pss_for_100_kib=intercept + 100 * slope,
        idle_cpu_ms_per_s=sum(idle) / len(idle) / idle_seconds * 1000,
    )
