"""The README's test command fails on a missing prerequisite; a developer's pytest skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import STRICT_ENV

REPO = Path(__file__).resolve().parent.parent


def test_scripts_test_is_strict() -> None:
    """scripts/test (so CI) sets the variable the prerequisite checks read."""
    assert f"export {STRICT_ENV}=1" in (REPO / "scripts" / "test").read_text()


@pytest.mark.parametrize("strict", ["1", ""])
def test_the_go_oracle_without_go(tmp_path: Path, strict: str) -> None:
    """No `go` on PATH: the oracle's tests fail when strict, and only skip otherwise."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    env = {**os.environ, "PATH": str(bin_dir), STRICT_ENV: strict}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "test_answers_match_go",
            "tests/test_go_wire.py",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    summary = run.stdout.strip().splitlines()[-1]
    if strict:
        assert run.returncode == 1 and " error" in summary, run.stdout  # at the fixture
        assert "prerequisite missing" in run.stdout
    else:
        assert run.returncode == 0 and "skipped" in summary and "error" not in summary, run.stdout
