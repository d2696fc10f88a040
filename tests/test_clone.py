"""The e2e tests pass from a clone wherever it lives (issue 12 §1).

The hardened unit hides /tmp (PrivateTmp=) and /root (ProtectHome=), the two
most common places for a clone: the service must not run code from there.
Each clone runs one short e2e test with this session's interpreter and the
clone's own code (its tests, its vmhost on PYTHONPATH, a container venv made
from its sources).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import container
import pytest
from conftest import prerequisite_missing
from container import ContainerUnavailable

pytestmark = pytest.mark.slow

E2E_TEST = "tests/test_systemd_e2e.py::test_first_connect_starts_a_stopped_instance"


def _git(*args: str, cwd: Path = container.REPO) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.parametrize("parent", ["/tmp", "/root"])
def test_e2e_passes_from_a_clone_under(parent: str) -> None:
    try:
        container.require_host()
    except ContainerUnavailable as e:
        prerequisite_missing(f"cannot start a systemd container here: {e}")
    if shutil.which("git") is None or not (container.REPO / ".git").exists():
        prerequisite_missing("not a git checkout")
    # The working tree as it is (tracked files, uncommitted changes included), else HEAD.
    tree = _git("stash", "create") or _git("rev-parse", "HEAD")
    clone = Path(tempfile.mkdtemp(prefix="vmhost-clone-", dir=parent))
    try:
        _git("clone", "--quiet", "--shared", "--no-checkout", str(container.REPO), str(clone))
        _git("checkout", "--quiet", "--detach", tree, cwd=clone)
        run = subprocess.run(
            [sys.executable, "-m", "pytest", E2E_TEST, "-q", "-p", "no:cacheprovider"],
            cwd=clone,
            env={**os.environ, "PYTHONPATH": str(clone)},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout[-4000:] + run.stderr
    finally:
        shutil.rmtree(clone)
