"""``vmhost check-config``: the config judged as ``serve`` loads it, for the cluster agent's
validate-all (issue 27), which maps exit 78 to OCF_ERR_CONFIGURED or OCF_ERR_INSTALLED."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import VM

from vmhost import cli


def check(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        cli.vmhost_main(["check-config", *argv])
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


def test_a_usable_config_passes(
    make_vm: Callable[..., VM], capsys: pytest.CaptureFixture[str]
) -> None:
    """A config serve would boot exits 0 and names the file it read."""
    vm = make_vm()
    assert check(capsys, "t", "--config", str(vm.config)) == (0, f"t: {vm.config}: ok\n", "")


def test_a_missing_disk_is_named(
    make_vm: Callable[..., VM], capsys: pytest.CaptureFixture[str]
) -> None:
    """A disk that is not there (shared storage not mounted) is exit 78, naming the field."""
    vm = make_vm()
    vm.disk.unlink()
    code, out, err = check(capsys, "t", "--config", str(vm.config))
    assert (code, out) == (os.EX_CONFIG, "")
    reason = f"disks[0].path: no such file or directory: {vm.disk}"
    assert err == f"vmhost check-config: {vm.config}: {reason}\n"


def test_broken_toml_is_refused(
    make_vm: Callable[..., VM], capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that is not TOML is exit 78 with serve's own reason."""
    vm = make_vm(toml="[machine]\nmemory_mib = 1\n")  # make_vm's [machine] gets a second table
    code, _, err = check(capsys, "t", "--config", str(vm.config))
    assert code == os.EX_CONFIG
    assert f"vmhost check-config: {vm.config}: invalid TOML" in err


def test_the_default_path_is_the_services(
    host_dirs: tuple[Path, Path], make_vm: Callable[..., VM], capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --config it reads NAME.toml where the unit does; an unknown VM is exit 78."""
    config_dir, _ = host_dirs
    vm = make_vm(toml="[console]\nfiles = 1\n")
    (config_dir / "web.toml").write_text(vm.config.read_text())
    code, out, err = check(capsys, "web")
    assert (code, out) == (os.EX_CONFIG, "")
    assert (
        err == f"vmhost check-config: {config_dir}/web.toml: console.files: expected >= 2, got 1\n"
    )
    code, out, err = check(capsys, "db")
    assert (code, out) == (os.EX_CONFIG, "")
    assert (
        err
        == f"vmhost check-config: {config_dir}/db.toml: cannot read: no such file or directory\n"
    )
