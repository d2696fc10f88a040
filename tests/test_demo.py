"""``bash scripts/demo`` (issue 12 §5): one line per phase, a failing phase's whole output."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import free_port
from fixtures import wait_for

from vmhost.client import Client
from vmhost.errors import ClientError

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "scripts/demo"


def test_a_failing_phase_shows_all_it_printed(tmp_path: Path) -> None:
    """apt fails: its line says FAILED, then everything apt printed; nothing after it runs."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "dpkg-query").write_text("#!/bin/sh\nexit 1\n")  # nothing is installed
    (fake / "apt-get").write_text(
        '#!/bin/sh\nfor i in $(seq 200); do echo "apt line $i"; done\necho "E: no luck" >&2\n'
        "exit 100\n"
    )
    for tool in fake.iterdir():
        tool.chmod(0o755)
    run = subprocess.run(
        ["bash", str(DEMO)],
        env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 1
    lines = run.stdout.splitlines()
    assert lines == ["packages     FAILED", *(f"apt line {i}" for i in range(1, 201)), "E: no luck"]


@pytest.mark.slow
def test_demo_boots_the_guest_in_a_few_lines(tmp_path: Path) -> None:
    """The whole demo (set-up included), moved away from /etc, /var/lib and /run: a line per
    phase, then the running VM's status."""
    env = {
        **os.environ,
        "CONFIGURATION_DIRECTORY": str(tmp_path / "etc"),
        "STATE_DIRECTORY": str(tmp_path / "state"),
        "VMHOST_RUN_DIR": str(tmp_path / "run"),
        "VMHOST_DEMO_SSH_PORT": str(free_port()),
    }
    socket = tmp_path / "run/demo/vmhost.sock"
    try:
        run = subprocess.run(
            ["bash", str(DEMO)], env=env, capture_output=True, text=True, timeout=600, check=False
        )
        assert run.returncode == 0, run.stdout + run.stderr
        lines = run.stdout.splitlines()
        for line, phase in zip(lines, ("packages", "venv", "guest image"), strict=False):
            assert re.fullmatch(rf"{phase} +ok \(\d+ s\)", line), lines
        assert re.fullmatch(r"boot +waiting for the guest .* \.\.\. ok \(\d+ s\)", lines[3]), lines
        assert lines[5] == "demo: running", lines
        assert len(lines) < 15, lines
        console = (tmp_path / "state/console.log").read_text()
        assert "TINYGUEST READY" in console
    finally:
        pid_file = tmp_path / "state/vmhost.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text())
            with contextlib.suppress(ClientError):
                Client(socket).force_stop()
            wait_for(lambda: _ended(pid), 30, "the demo's vmhost to end")


def _ended(pid: int) -> bool:
    """Gone, or a zombie: nohup made it an orphan that whatever PID 1 is here may not reap."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True
