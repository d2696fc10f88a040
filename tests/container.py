"""A real systemd, booted with systemd-nspawn, for end-to-end tests.

The recipe is the verified one in docs/test-infra.md ("systemd in a
container"): the host's own root, volatile (only /usr is the host's), each
container started from its own cgroup, entered with ``nsenter``.  vmhost runs
from a venv holding a copy of the repo's code (wherever the checkout is), made
with the host's ``/usr/bin/python3``, the only interpreter a volatile container
sees.  Everything started here is torn down by the ``boot`` context manager,
whatever the test did.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parent.parent
# Not under /tmp or /var/tmp: the service's PrivateTmp= would hide the venv from ExecStart.
VENV_CACHE: Final = Path(os.environ.get("VMHOST_TEST_VENV_CACHE", "/var/cache/vmhost-test"))
_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ENV: Final = {"PATH": _PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
_HIERARCHIES: Final = ("systemd", "unified")
CLUSTER_UNITS: Final = ("corosync.service", "pacemaker.service", "logd.service", "ssh.service")
"""Enabled by presets once the cluster packages are installed (scripts/setup): they would
fail in every container that is not a node of tests/cluster.py's cluster, so they are masked."""


class ContainerUnavailable(Exception):
    """This host cannot boot a container at all (not root, no nspawn, no cgroup fs): skip."""


class ContainerError(Exception):
    """The container misbehaved (boot timeout, a command failed); the message has the evidence."""


def venv(repo: Path = REPO, cache: Path = VENV_CACHE) -> Path:
    """A /usr/bin/python3 venv with a copy of the repo's code installed, one per source hash.

    Not editable: the hardened unit sees neither /tmp (PrivateTmp=) nor /root
    and /home (ProtectHome=), where checkouts live, so the venv holds the
    code itself.  The key covers the installed sources and the interpreter,
    so any change rebuilds it (about 10 s, wheels come from pip's cache) and
    every test session of the same tree shares it.
    """
    python = Path("/usr/bin/python3")
    if not python.exists():
        raise ContainerUnavailable("no /usr/bin/python3: nothing could run vmhost inside /usr")
    sources = _package_sources(repo)
    key = hashlib.sha256(os.readlink(python).encode() if python.is_symlink() else b"")
    for name in sources:
        key.update(name.encode() + b"\0" + (repo / name).read_bytes() + b"\0")
    target = cache / f"venv-{key.hexdigest()[:16]}"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # other sessions build the same venv
        _prune(cache, keep=target)
        if (target / ".complete").exists():
            (target / ".complete").touch()  # in use: not pruned
            return target
        shutil.rmtree(target, ignore_errors=True)  # a build that died half-way
        try:
            with tempfile.TemporaryDirectory(dir=cache, prefix=".src-") as src:
                # pip builds in the source tree: build it from a copy of exactly what was hashed.
                for name in sources:
                    (Path(src) / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(repo / name, Path(src) / name)
                subprocess.run([str(python), "-m", "venv", str(target)], check=True)
                pip = str(target / "bin/pip")
                subprocess.run([pip, "install", "--quiet", src], check=True)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        (target / ".complete").touch()
    return target


def _package_sources(repo: Path) -> list[str]:
    """What ``pip install`` reads from the repo, relative to it."""
    code = sorted(
        str(p.relative_to(repo))
        for p in (repo / "vmhost").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    return ["pyproject.toml", "README.md", *code]


def _prune(cache: Path, keep: Path, unused_days: float = 2) -> None:
    """Remove venvs of older trees that no session used for a while, and dead half-builds.

    Called under the lock: builds happen under it too, so an incomplete venv is a dead one.
    """
    for old in cache.glob("venv-*"):
        stamp = old / ".complete"
        unused = not stamp.exists() or time.time() - stamp.stat().st_mtime > unused_days * 86400
        if old != keep and unused:
            shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class Container:
    """A booted container: ``pid`` is its PID 1 as the host sees it."""

    name: str
    pid: int

    def run(
        self,
        *argv: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside every namespace of the container (not as a unit)."""
        proc = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-a", "--", *argv],
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            env=_ENV,
            check=False,
        )
        if check and proc.returncode != 0:
            raise ContainerError(
                f"{' '.join(argv)} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def popen(self, *argv: str) -> subprocess.Popen[str]:
        """Start argv inside, in the background; its stdout is a text pipe."""
        return subprocess.Popen(
            ["nsenter", "-t", str(self.pid), "-a", "--", *argv],
            stdout=subprocess.PIPE,
            text=True,
            env=_ENV,
        )

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("systemctl", *args, check=check)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def write(self, path: str, text: str) -> None:
        """Create ``path`` and its parents inside the container (its /etc is not the host's)."""
        self.run("sh", "-c", 'mkdir -p "$(dirname "$1")" && cat >"$1"', "sh", path, input=text)

    def journal(self, *matches: str) -> list[dict[str, Any]]:
        """Journal records as JSON objects, after making sure journald has written what it has."""
        self.run("journalctl", "--sync")
        out = self.run("journalctl", "--no-pager", "-o", "json", *matches).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def install_units(self, unit_files: Sequence[Path], venv: Path) -> None:
        """Install units in /etc/systemd/system, ExecStart pointed at the venv's vmhost."""
        for unit in unit_files:
            self.write(f"/etc/systemd/system/{unit.name}", unit.read_text())
            if unit.suffix == ".service":
                # "10-": a test's own drop-in (named with a letter) comes later and wins.
                self.write(
                    f"/etc/systemd/system/{unit.name}.d/10-venv.conf",
                    f"[Service]\nExecStart=\nExecStart={venv}/bin/vmhost serve %i\n",
                )
        self.systemctl("daemon-reload")


def require_host() -> None:
    """Raise ContainerUnavailable (a reason to skip) when this host cannot boot a container."""
    if os.geteuid() != 0:
        raise ContainerUnavailable("systemd-nspawn needs root")
    for tool in ("systemd-nspawn", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            raise ContainerUnavailable(
                f"{tool} is not installed (apt: systemd-container, util-linux)"
            )
    if not os.access("/sys/fs/cgroup", os.W_OK):
        raise ContainerUnavailable(
            "/sys/fs/cgroup is not writable: no cgroup of our own to boot from"
        )


def _cgroup_dirs(cgroup: str) -> list[Path]:
    root = Path("/sys/fs/cgroup")
    hybrid = [root / h for h in _HIERARCHIES if (root / h / "cgroup.procs").exists()]
    return [h / cgroup for h in hybrid] if hybrid else [root / cgroup]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        return ""


def _procs(cgroup_dir: Path) -> set[int]:
    return {
        int(pid) for procs in cgroup_dir.rglob("cgroup.procs") for pid in procs.read_text().split()
    }


def machine_name(name: str) -> str:
    """The machine name, and hostname, ``boot(name)`` gives its container: nspawn keys its
    /run state by machine name, so it is unique per test session."""
    return f"{name}-{os.getpid()}"


@contextlib.contextmanager
def boot(
    name: str,
    *,
    binds: Sequence[str] = (),
    ro_binds: Sequence[str] = (),
    overlay: bool = False,
    masks: Sequence[str] = (),
    cluster_node: bool = False,
    timeout: float = 60,
) -> Iterator[Container]:
    """Boot the host's own OS in a container; yield it once booted; always tear it down.

    ``overlay=False``: ``--volatile=yes`` (a fresh /etc, /var; the host's
    /usr).  ``overlay=True``: the whole host root under a throwaway overlay
    (``dpkg -i`` inside leaves the host alone), bound in a private mount
    namespace because nspawn refuses ``--volatile=overlay`` on ``-D /``.
    ``binds``/``ro_binds`` take nspawn's ``SRC[:DST]``; ``masks`` are units
    masked at boot, :data:`CLUSTER_UNITS` too unless ``cluster_node``.
    """
    require_host()
    name = machine_name(name)
    if not cluster_node:
        masks = [*masks, *CLUSTER_UNITS]
    cgroup = f"vmhost-test-{name}"
    cgroup_dirs = _cgroup_dirs(cgroup)
    for d in cgroup_dirs:
        d.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix=f"nspawn-{name}-"))  # errors quote its tail
    root_dir = Path(tempfile.mkdtemp(prefix=f"nspawn-root-{name}-")) if overlay else None

    nspawn = [
        "systemd-nspawn",
        "--quiet",
        "--boot",
        "--register=no",
        "--keep-unit",
        f"--machine={name}",
        "--console=passive",
        *(["--bind=/dev/kvm"] if Path("/dev/kvm").exists() else []),
        *(f"--bind={b}" for b in binds),
        *(f"--bind-ro={b}" for b in ro_binds),
    ]
    if root_dir is None:
        nspawn += ["--directory=/", "--volatile=yes"]
    else:
        nspawn += [f"--directory={root_dir}", "--volatile=overlay"]
    nspawn += ["--", "systemd.firstboot=off", *(f"systemd.mask={m}" for m in masks)]
    if root_dir is not None:
        nspawn = [
            "unshare", "--mount", "--propagation=private", "--",
            "sh", "-c", 'mount --bind / "$0" && exec "$@"', str(root_dir), *nspawn,
        ]  # fmt: skip
    enter_cgroup = "; ".join(f"echo $$ >{d}/cgroup.procs" for d in cgroup_dirs)
    argv = ["sh", "-c", f'{enter_cgroup}; exec "$@"', "sh", *nspawn]

    log_file = open(logs / "nspawn.log", "wb")  # noqa: SIM115 -- closed in finally below
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
    pid1 = None
    try:
        pid1 = _wait_for_init(proc, logs, timeout)
        container = Container(name, pid1)
        _wait_for_boot(container, proc, logs, timeout)
        yield container
    finally:
        _teardown(proc, pid1, cgroup_dirs)
        log_file.close()
        shutil.rmtree(logs)
        if root_dir is not None:
            root_dir.rmdir()


def _nspawn_failed(proc: subprocess.Popen[bytes], logs: Path, what: str) -> ContainerError:
    tail = (logs / "nspawn.log").read_text(errors="replace")[-2000:]
    return ContainerError(f"{what} (nspawn exit {proc.poll()}); nspawn log:\n{tail}")


def _wait_for_init(proc: subprocess.Popen[bytes], logs: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _nspawn_failed(proc, logs, "nspawn exited before the container's systemd ran")
        for child in _children(proc.pid):
            if _comm(child) == "systemd":
                return child
        time.sleep(0.02)
    raise _nspawn_failed(proc, logs, f"no systemd under nspawn after {timeout} s")


def _wait_for_boot(
    container: Container, proc: subprocess.Popen[bytes], logs: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _nspawn_failed(proc, logs, "the container halted while booting")
        # Fails until the manager is up; then blocks until boot is over.
        state = container.run(
            "systemctl", "is-system-running", "--wait", check=False, timeout=timeout
        ).stdout.strip()
        if state in ("running", "degraded"):
            return
        time.sleep(0.05)
    raise _nspawn_failed(proc, logs, f"not booted after {timeout} s (last state {state!r})")


def _entered(pid1: int, cgroup_dirs: Sequence[Path]) -> list[int]:
    """Processes that nsenter put in the container: in its PID namespace, outside its cgroup.

    The container's shutdown only kills its own cgroup and then waits 90 s
    for these orphans, now children of its PID 1.
    """
    namespace = os.readlink(f"/proc/{pid1}/ns/pid")
    own = set().union(*(_procs(d) for d in cgroup_dirs if d.exists()))
    entered = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in own:
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns/pid") == namespace:
                    entered.append(int(entry.name))
    return entered


def _teardown(proc: subprocess.Popen[bytes], pid1: int | None, cgroup_dirs: Sequence[Path]) -> None:
    """Orderly halt, then harder; never SIGKILL nspawn itself (the container would live on)."""
    if proc.poll() is None:
        if pid1 is not None:
            for pid in _entered(pid1, cgroup_dirs):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            # Container PID 1 (by now systemd-shutdown, if it got that far): ending it ends nspawn.
            first = pid1 or next((c for c in _children(proc.pid) if _comm(c) == "systemd"), None)
            if first is not None:
                os.kill(first, signal.SIGKILL)
            proc.wait(timeout=20)
    for d in cgroup_dirs:
        # Whatever survived was started by this container: end it by pid.
        for pid in _procs(d) if d.exists() else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while d.exists() and _procs(d) and time.monotonic() < deadline:
            time.sleep(0.05)
        for sub in (
            sorted(d.rglob("*"), key=lambda p: len(p.parts), reverse=True) if d.exists() else []
        ):
            if sub.is_dir():
                sub.rmdir()
        if d.exists():
            d.rmdir()
