"""``vmhostctl console`` on a real guest, driven through a pseudo-terminal as a person would:
attach, see the boot in the history, type into the guest's shell, detach with Ctrl-], and
find the terminal as it was; read-only, --force and a reload while attached.
"""

from __future__ import annotations

import os
import pty
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import pytest
from conftest import VM
from fixtures import ENV, Vmhost, vmhost_factory, wait_for

from vmhost.client import Client

pytestmark = pytest.mark.slow

MakeVM = Callable[..., VM]
VMHOSTCTL: Final = (
    f"{shlex.quote(sys.executable)} -c "
    "'import sys; from vmhost.cli import vmhostctl_main; sys.exit(vmhostctl_main())'"
)
CTRL_BRACKET: Final = b"\x1d"
TIMEOUT: Final = 30.0
"""For the guest's answer to a typed line (TCG, with other guests on the cores)."""


class Terminal:
    """A shell script in a pseudo-terminal: what it prints is read, keys are typed into it."""

    def __init__(self, script: str, cwd: Path) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: never back into pytest
            try:
                os.chdir(cwd)
                os.execve("/bin/sh", ["sh", "-c", script], ENV)
            finally:
                os._exit(127)
        self.seen = b""
        self.shown = b""
        """Everything the terminal showed."""
        self.status: int | None = None

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def expect(self, pattern: bytes, timeout: float = TIMEOUT) -> re.Match[bytes]:
        """Until ``pattern`` (a regex) shows in what was printed after the last match."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while (found := regex.search(self.seen)) is None:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError(f"{pattern!r} not seen; the terminal showed:\n{self.text()}")
        self.seen = self.seen[found.end() :]
        return found

    def never(self, pattern: bytes, seconds: float) -> None:
        """``pattern`` does not show within ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and self._read(left):
            pass
        assert re.search(pattern, self.seen) is None, self.text()

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if ready:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # EIO: the script ended and the pty closed
                return False
            self.seen += data
            self.shown += data
            return bool(data)
        return True

    def text(self) -> str:
        return self.seen.decode(errors="replace")

    def wait(self, timeout: float = TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
            elif time.monotonic() > deadline:
                raise AssertionError(f"the terminal's script did not end:\n{self.text()}")
            else:
                self._read(0.05)
        return self.status

    def close(self) -> None:
        if self.status is None:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture
def booted(make_vm: MakeVM) -> Iterator[Vmhost]:
    """A running guest under a real ``vmhost serve``, its shell on the serial console."""
    factory = vmhost_factory()
    try:
        vmhost = next(factory)(make_vm())
        vmhost.boot()
        vmhost.wait_console("tinyguest# ")
        yield vmhost
    finally:  # a set-up that failed kills its vmhost too
        next(factory, None)


@pytest.fixture
def terminals() -> Iterator[Callable[[str, Path], Terminal]]:
    made: list[Terminal] = []

    def make(script: str, cwd: Path) -> Terminal:
        made.append(Terminal(script, cwd))
        return made[-1]

    yield make
    for terminal in made:
        terminal.close()


def console(vmhost: Vmhost, *args: str) -> str:
    """The shell command line that attaches to ``vmhost``'s console."""
    return f"{VMHOSTCTL} --socket {shlex.quote(str(vmhost.socket))} console {shlex.join(args)}"


def ran(vmhost: Vmhost, text: str) -> bool:
    """Whether the guest printed ``text`` on its console (console.log, whoever typed)."""
    return text.encode() in vmhost.vm.console.read_bytes()


def test_attach_type_detach(
    booted: Vmhost, terminals: Callable[[str, Path], Terminal], tmp_path: Path
) -> None:
    """The history shows the boot; a typed command is answered by the guest; Ctrl-] detaches
    with exit 0, the VM untouched, and `stty -a` shows the terminal as it was before."""
    script = (
        f"tty >tty; stty -a >before; {console(booted, '--lines', '1000')}; "
        'echo "exit=$?"; stty -a >after'
    )
    term = terminals(script, tmp_path)
    term.expect(rb"Connected to .*console, read-write.* Ctrl-\] detaches\.")
    term.expect(rb"TINYGUEST READY")  # the history: the guest booted before we came
    term.expect(rb"tinyguest# ")
    raw = subprocess.run(
        ["stty", "-a", "-F", (tmp_path / "tty").read_text().strip()],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "-icanon" in raw.split() and "-echo" in raw.split(), raw
    term.type(b"echo typed-$((6*7))\r")
    term.expect(rb"typed-42")
    term.type(CTRL_BRACKET)
    term.expect(rb"exit=0")
    assert term.wait() == 0
    before, after = ((tmp_path / name).read_text() for name in ("before", "after"))
    assert "icanon" in before.split() and after == before
    assert booted.status().vm_state == "running"


def test_read_only_cannot_type(
    booted: Vmhost, terminals: Callable[[str, Path], Terminal], tmp_path: Path
) -> None:
    """--read-only shows the output but what is typed never reaches the guest."""
    term = terminals(console(booted, "--read-only"), tmp_path)
    term.expect(rb"console, read-only\. Ctrl-\] detaches")
    term.type(b"echo ro-$((2*21))\r")
    term.never(rb"ro-42", 3.0)
    assert not ran(booted, "ro-42")
    term.type(CTRL_BRACKET)
    assert term.wait() == 0


def test_second_attach_read_only_and_force_takes_over(
    booted: Vmhost, terminals: Callable[[str, Path], Terminal], tmp_path: Path
) -> None:
    """A second interactive attach is read-only and says who types; --force takes the input,
    and the first is told and can no longer type."""
    first = terminals(console(booted), tmp_path)
    first.expect(rb"console, read-write\.")
    second = terminals(console(booted), tmp_path)
    second.expect(rb"console, read-only: root \(pid \d+\) has the input; attach with --force")
    second.type(CTRL_BRACKET)
    assert second.wait() == 0
    taker = terminals(console(booted, "--force"), tmp_path)
    taker.expect(rb"console, read-write\.")
    first.expect(rb"\[vmhostctl console: root \(pid \d+\) took over the input\]")
    first.type(b"echo first-$((10+1))\r")
    taker.type(b"echo taker-$((10+2))\r")
    taker.expect(rb"taker-12")
    first.expect(rb"taker-12")  # the first still sees the output
    assert not ran(booted, "first-11")
    for term in (first, taker):
        term.type(CTRL_BRACKET)
        assert term.wait() == 0


def test_attached_across_a_reload(
    booted: Vmhost, terminals: Callable[[str, Path], Terminal], tmp_path: Path
) -> None:
    """A reload (SIGHUP) while attached: the console attaches again by itself, still typing,
    and what the guest printed meanwhile is shown once; a new attach right after shows the
    history."""
    term = terminals(console(booted), tmp_path)
    term.expect(rb"read-write")
    term.expect(rb"tinyguest# ")
    term.type(b"(sleep 1; echo during-$((3*3)))&\r")
    term.expect(rb"\r\n")
    booted.signal(signal.SIGHUP)
    term.expect(rb"vmhost reloaded; attached again, read-write")
    wait_for(lambda: "vmhost reloaded (SIGHUP)" in booted.output(), 30, "the reload")
    term.expect(rb"during-9")
    term.type(b"echo after-$((5*5))\r")
    term.expect(rb"after-25")
    assert term.shown.count(b"during-9") == 1, "lost or shown twice across the reload"
    again = terminals(console(booted, "--read-only", "--lines", "20"), tmp_path)
    again.expect(rb"during-9")
    again.expect(rb"after-25")
    for t in (term, again):
        t.type(CTRL_BRACKET)
        assert t.wait() == 0


def test_not_a_terminal_streams_and_types(booted: Vmhost, tmp_path: Path) -> None:
    """With stdin a pipe: the output is streamed, stdin's bytes are typed (no raw mode, no
    banner), and the command runs on after stdin's end, like logs -f, until the VM ends:
    then it says so and exits 0."""
    proc = subprocess.Popen(
        shlex.split(console(booted, "--lines", "0")),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"echo piped-$((4*4))\n")
    proc.stdin.close()
    out = b""
    deadline = time.monotonic() + TIMEOUT
    while b"piped-16" not in out and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1)
        if ready:
            out += os.read(proc.stdout.fileno(), 65536)
    assert b"piped-16" in out
    assert proc.poll() is None
    Client(booted.socket).stop(30)
    assert proc.wait(60) == 0
    assert proc.stderr is not None
    err = proc.stderr.read()
    assert b"Connected" not in err
    assert b"[vmhostctl console: vmhost is exiting]" in err
