"""The servers under measurement: the real ``vmhost serve`` and the server-only stand-in."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

from . import proc

REPO: Final = Path(__file__).resolve().parent.parent
SERVE: Final = "import sys; from vmhost.cli import vmhost_main; sys.exit(vmhost_main())"
"""How ``vmhost serve`` is started: the interpreter itself, never a shim or wrapper script."""

STATUS: Final = '{"method":"status"}'
INFO: Final = '{"method":"info"}'
FORCE_STOP: Final = b'{"method":"force_stop"}\n'
RUNNING: Final = '{"ok":true,"state":"running"}'
STOPPING: Final = b'{"ok":true,"state":"stopping"}\n'


_DROPPED: Final = frozenset({"NOTIFY_SOCKET", "PYTHONDONTWRITEBYTECODE"})
"""Not inherited: a stray notify socket, and a ban on bytecode caches that would make every
start recompile vmhost from source, which no installed package does."""


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def blank_vm(directory: Path, name: str) -> Path:
    """A VM config whose QEMU runs but boots nothing: firmware finds no disk and halts.

    READY=1 comes once QEMU runs, not when a guest has booted, so this is
    all exec → READY needs; the option ROM is off so the firmware does not
    spend CPU on network boot while the server is measured.
    """
    directory.mkdir(parents=True, exist_ok=True)
    disk = directory / "blank.img"
    if not disk.exists():
        with disk.open("wb") as f:
            f.truncate(1024 * 1024)
    config = directory / f"{name}.toml"
    config.write_text(
        "[machine]\n"
        'accel = "tcg"\n'
        "memory_mib = 64\n\n"
        "[network]\n"
        f"ssh_port = {free_port()}\n\n"
        "[[disks]]\n"
        f'path = "{disk}"\n\n'
        "[qemu]\n"
        'extra_args = ["-global", "virtio-net-pci.romfile="]\n'
    )
    return config


def ask(path: Path, request: bytes, timeout: float = 5.0) -> bytes:
    """One exchange, Go-client style: dial, write a line, read a line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(request)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer


def answers(path: Path) -> bool:
    try:
        return ask(path, STATUS.encode() + b"\n", timeout=1.0) == RUNNING.encode() + b"\n"
    except OSError:
        return False


class Target:
    """One running server process, its socket and the answers it must give."""

    label: str
    info: str

    def __init__(self, process: subprocess.Popen[bytes], sock: Path) -> None:
        self.process = process
        self.sock = sock

    @property
    def pid(self) -> int:
        return self.process.pid

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class StandIn(Target):
    """The control server alone, with a controller that answers like a running VM."""

    info = '{"ok":true,"state":"running","ssh_port":2222,"backend":"qemu"}'

    def __init__(
        self,
        workdir: Path,
        loop: str,
        *,
        profile: Path | None = None,
        name: str = "",
        env: dict[str, str] | None = None,
        python: list[str] | None = None,
        changes: float = 0.0,
        ready_timeout: float = 10.0,
    ) -> None:
        self.label = f"Server alone (stand-in controller), {loop} loop"
        sock = workdir / f"standin-{loop}{name}.sock"
        argv = [*(python or [sys.executable]), "-m", "bench.standin", str(sock), "--loop", loop]
        if profile is not None:
            argv += ["--profile", str(profile)]
        if changes:
            argv += ["--changes", str(changes)]
        process = proc.spawn(
            argv,
            cpu=proc.SERVER_CPU,
            env=env or environment(),
            cwd=REPO,
            stdout=subprocess.DEVNULL,
        )
        super().__init__(process, sock)
        proc.wait_for(lambda: answers(sock), ready_timeout, "the stand-in to answer")


class Reference(Target):
    """``refserver.c``: the same exchange with no work at all, i.e. this kernel's ceiling."""

    label = "Reference: minimal C epoll server (the machine's ceiling, not vmhost)"
    info = RUNNING  # it answers every line alike

    def __init__(self, workdir: Path, binary: Path) -> None:
        sock = workdir / "reference.sock"
        argv = [str(binary), str(sock), RUNNING]
        process = proc.spawn(argv, cpu=proc.SERVER_CPU, stdout=subprocess.DEVNULL)
        super().__init__(process, sock)
        proc.wait_for(lambda: answers(sock), 10, "the reference server to answer")


class Service(Target):
    """``vmhost serve`` with a real QEMU (no guest), server and QEMU on the server CPU."""

    def __init__(
        self,
        workdir: Path,
        name: str = "bench",
        *,
        cpu: int | None = proc.SERVER_CPU,
        env: dict[str, str] | None = None,
        isolated: bool = False,
    ) -> None:
        """``env`` and ``isolated`` (``python -S``) serve another copy of the package."""
        self.label = "vmhost serve (real controller, QEMU without guest)"
        vmdir = workdir / name
        config = blank_vm(vmdir, name)
        port = config.read_text().split("ssh_port = ")[1].split()[0]
        self.info = f'{{"ok":true,"state":"running","ssh_port":{port},"backend":"qemu"}}'
        sock = vmdir / "vmhost.sock"
        self.started = time.perf_counter()
        argv = serve_argv(name, config, sock, vmdir / "state")
        process = proc.spawn(
            [argv[0], "-S", *argv[1:]] if isolated else argv,
            cpu=cpu,
            env=env or environment(),
            cwd=vmdir if isolated else None,  # python -c puts its cwd first on sys.path
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(vmdir / "vmhost.log").open("wb"),
        )
        super().__init__(process, sock)

    def wait_serving(self) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"vmhost exited with {self.process.returncode}")
            return answers(self.sock)

        proc.wait_for(ready, 20, "vmhost to answer")


def serve_argv(name: str, config: Path, sock: Path, state_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-c",
        SERVE,
        "serve",
        name,
        "--config",
        str(config),
        "--socket",
        str(sock),
        "--state-dir",
        str(state_dir),
    ]
