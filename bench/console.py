"""A console flood while a console is attached: a good client's ``status`` latency, against
the same guest busy but silent.

``python3 -m bench.console [--seconds S]`` boots the tiny guest under ``vmhost serve``
with ``guest.busy=S guest.flood=S``: first S seconds as busy as a flood but printing
nothing, then S seconds printing as fast as it can.  ``vmhostctl console --read-only``
is attached all along (its output read and counted), and a client asks ``status`` every
5 ms, one connection each, as the Go client does.  The goal (issue 25): p99 while
flooding within 2x of quiet.  Exits 1 if it is not met.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Final

import msgspec

from . import proc
from .lifecycle import BOOT_TIMEOUT, GUEST_CACHE, _guest_builder
from .targets import SERVE, STATUS, environment, free_port

CTL: Final = "import sys; from vmhost.cli import vmhostctl_main; sys.exit(vmhostctl_main())"
PAUSE: Final = 0.005


class Phase(msgspec.Struct, kw_only=True):
    calls: int
    p50_ms: float
    p99_ms: float
    console_bytes: int
    """What the attached console received during the phase."""
    vmhost_cpu: float
    """vmhost's CPU (not QEMU's), in cores."""


class Result(msgspec.Struct, kw_only=True):
    seconds: int
    quiet: Phase
    flood: Phase
    ratio: float
    within_goal: bool


def main() -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.console", description=__doc__)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--guest-cache", type=Path, default=GUEST_CACHE)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vmhost-bench-console-") as tmp:
        result = run(Path(tmp), args.guest_cache, args.seconds)
    print(msgspec.json.format(msgspec.json.encode(result)).decode())
    return 0 if result.within_goal else 1


def run(work: Path, guest_cache: Path, seconds: int) -> Result:
    builder = _guest_builder()
    image = builder.build(guest_cache)
    disk = builder.fresh_disk(image, work / "disk.img")
    config = work / "flood.toml"
    config.write_text(
        f'[machine]\naccel = "tcg"\n[boot]\nkernel = "{image.kernel}"\ninitrd = "{image.initrd}"\n'
        f'cmdline = "console=ttyS0 quiet panic=-1 guest.busy={seconds} guest.flood={seconds}"\n'
        f'[[disks]]\npath = "{disk}"\n[network]\nssh_port = {free_port()}\n'
        "[console]\nfile_kib = 256\nfiles = 2\n"
    )
    sock, console = work / "vmhost.sock", work / "console.log"
    serve = [sys.executable, "-c", SERVE, "serve", "flood", "--config", str(config)]
    serve += ["--socket", str(sock), "--state-dir", str(work)]
    with (work / "vmhost.log").open("wb") as log:
        vmhost = subprocess.Popen(serve, env=environment(), stdout=log, stderr=log)
    attached: subprocess.Popen[bytes] | None = None
    try:
        proc.wait_for(_Follow(console).__call__, BOOT_TIMEOUT, "the boot")
        attached = subprocess.Popen(
            [sys.executable, "-c", CTL, "--socket", str(sock), "console", "--read-only"],
            env=environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
        )
        assert attached.stdout is not None
        counter = _Counter(attached.stdout)
        quiet = _phase(sock, console, b"BUSY DONE", vmhost.pid, counter, seconds)
        flood = _phase(sock, console, b"FLOOD DONE", vmhost.pid, counter, seconds)
    finally:
        if attached is not None:
            attached.kill()
            attached.wait()
        vmhost.terminate()
        vmhost.wait(60)
    ratio = flood.p99_ms / quiet.p99_ms
    return Result(seconds=seconds, quiet=quiet, flood=flood, ratio=ratio, within_goal=ratio <= 2)


class _Counter(threading.Thread):
    """Reads the attached console's output as fast as it comes, counting bytes."""

    def __init__(self, stream: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.total = 0
        self.start()

    def run(self) -> None:
        while data := os.read(self.stream.fileno(), 1 << 16):
            self.total += len(data)


def _phase(
    sock: Path, console: Path, end: bytes, pid: int, counter: _Counter, seconds: int
) -> Phase:
    """``status`` latencies until the guest prints ``end``."""
    latencies: list[float] = []
    received, cpu = counter.total, proc.cpu_seconds(pid)
    started = time.monotonic()
    deadline = started + seconds + BOOT_TIMEOUT
    printed = _Follow(console)
    while not printed(end):
        before = time.perf_counter()
        answer = _ask(sock)
        latencies.append(time.perf_counter() - before)
        if not answer.startswith(b'{"ok":true,"state":"running"'):
            raise RuntimeError(f"status answered {answer!r}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{end!r} never came")
        time.sleep(PAUSE)
    elapsed = time.monotonic() - started
    latencies.sort()
    return Phase(
        calls=len(latencies),
        p50_ms=latencies[len(latencies) // 2] * 1e3,
        p99_ms=latencies[int(len(latencies) * 0.99)] * 1e3,
        console_bytes=counter.total - received,
        vmhost_cpu=(proc.cpu_seconds(pid) - cpu) / elapsed,
    )


def _ask(sock: Path) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(STATUS.encode() + b"\n")
        return s.makefile("rb").readline()


class _Follow:
    """What the guest prints from now on, read as it is appended to console.log (only the
    new bytes: reading the file whole would cost what is measured); a rotation starts the
    new file from its beginning."""

    def __init__(self, console: Path) -> None:
        self.console = console
        self.inode = self.offset = 0
        with contextlib.suppress(FileNotFoundError):
            st = console.stat()
            self.inode, self.offset = st.st_ino, st.st_size
        self.tail = b""

    def __call__(self, text: bytes = b"TINYGUEST READY") -> bool:
        try:
            f = self.console.open("rb")
        except FileNotFoundError:
            return False
        with f:
            inode = os.fstat(f.fileno()).st_ino
            if inode != self.inode:
                self.inode, self.offset = inode, 0
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        self.tail = self.tail[-len(text) :] + data
        return text in self.tail


if __name__ == "__main__":
    sys.exit(main())
