"""Who may reach a VM: the socket's mode (0660), a user without group access refused, and
instance names that would escape their directories refused before any file is touched."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import pytest
from conftest import VM
from fixtures import ENV, Vmhost

from vmhost.control import wire
from vmhost.paths import RUN_DIR, STATE_ROOT
from vmhost.service import EXIT_CONFIG

MakeVM = Callable[..., VM]
VmhostFor = Callable[[VM], Vmhost]

_CONNECT: Final = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    sys.exit(13)
s.sendall(b'{"method":"status"}\\n')
sys.stdout.write(s.makefile().readline())
"""


_VMHOSTCTL: Final = "import sys; from vmhost.cli import vmhostctl_main; sys.exit(vmhostctl_main())"


def as_user(uid: int, gid: int, path: Path) -> subprocess.CompletedProcess[str]:
    """Connect to ``path`` as uid:gid with no supplementary groups (setpriv drops them)."""
    return subprocess.run(
        [
            *("setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"),
            *("/usr/bin/python3", "-c", _CONNECT, str(path)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory everyone may traverse, so only the socket's own mode decides."""
    with tempfile.TemporaryDirectory(prefix="vmhost-access-") as name:
        os.chmod(name, 0o755)
        yield Path(name)


@pytest.mark.slow
def test_socket_mode_and_other_users(
    make_vm: MakeVM, vmhost_for: VmhostFor, open_dir: Path
) -> None:
    """The socket is 0660: a user outside its group is refused, the same user in it is served."""
    vm = vmhost_for(make_vm())
    vm.socket = open_dir / "vmhost.sock"
    vm.start()
    vm.wait_running()
    st = vm.socket.stat()
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    nobody = pwd.getpwnam("nobody")
    outsider = as_user(nobody.pw_uid, nobody.pw_gid, vm.socket)
    assert outsider.returncode == 13, outsider
    member = as_user(nobody.pw_uid, st.st_gid, vm.socket)
    assert member.returncode == 0, member
    assert wire.decode_response(member.stdout.encode()).state == "running"
    assert vm.status().vm_state == "running"


@pytest.mark.parametrize(
    "name", ["../etc", "..", ".", "a/b", "/etc/passwd", "", "-rf", "x" * 65, "a\nb", ".hidden"]
)
def test_instance_names_cannot_escape(name: str, tmp_path: Path) -> None:
    """A name that is not one safe path component is refused before any file is touched."""
    env = {**ENV, "CONFIGURATION_DIRECTORY": str(tmp_path / "etc" / "vmhost")}
    env["STATE_DIRECTORY"] = ""
    # Where the name would lead if it were used: nothing may appear there either.
    targets = [RUN_DIR / name / "vmhost.sock", STATE_ROOT / name]
    existed = [os.path.lexists(t) for t in targets]
    before = set(tmp_path.rglob("*"))
    serve = subprocess.run(
        [sys.executable, "-m", "vmhost", "serve", "--", name],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=30,
    )
    assert serve.returncode == EXIT_CONFIG, serve
    assert "invalid VM name" in serve.stderr
    assert set(tmp_path.rglob("*")) == before
    assert [os.path.lexists(t) for t in targets] == existed
    ctl = subprocess.run(
        [sys.executable, "-c", _VMHOSTCTL, "status", "--", name],
        capture_output=True,
        text=True,
        env=ENV,
    )
    refusal = "invalid VM name" if name else "give a VM NAME"
    assert ctl.returncode == 1 and refusal in ctl.stderr, ctl
