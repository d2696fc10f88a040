"""The Debian package (issue 6): built by packaging/build-deb, installed with apt into a real
systemd (an overlay container: the host's dpkg database and files stay untouched), one VM run
through its units, then removed and purged."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import container
import pytest
from conftest import CACHE, free_port, prerequisite_missing
from container import Container, ContainerUnavailable
from guest.build import GuestImage

import vmhost
from vmhost import cli
from vmhost.journal import Event

REPO = container.REPO
BUILD_DEB = REPO / "packaging" / "build-deb"
MAN = REPO / "docs" / "man"
DEB_CACHE = CACHE / "deb"
VENV = "/opt/venvs/vmhost"
UNITS = ("/lib/systemd/system/vmhost@.service", "/lib/systemd/system/vmhost@.socket")
OCF_AGENT = "/usr/lib/ocf/resource.d/vmhost/vm"


def _help(
    main: Callable[[Sequence[str] | None], int], *argv: str, capsys: pytest.CaptureFixture[str]
) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


def _man_text(page: Path) -> str:
    """The page's words without roff font and dash escapes: what a reader sees."""
    return re.sub(r"\\f[BIRP]", "", page.read_text()).replace("\\-", "-")


def test_vmhostctl_man_page_documents_every_command_and_option(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each vmhostctl command and each of their long options appears in vmhostctl(1)."""
    page = _man_text(MAN / "vmhostctl.1")
    for command in cli._COMMANDS:
        assert re.search(rf"^(\.B\w* )?{re.escape(command)}\b", page, re.MULTILINE), command
        options = set(
            re.findall(r"--[a-z][a-z-]+", _help(cli.vmhostctl_main, command, capsys=capsys))
        )
        for option in options - {"--help"}:
            assert option in page, f"{command} {option}"


def test_vmhost_man_page_documents_every_serve_option(capsys: pytest.CaptureFixture[str]) -> None:
    """Each ``vmhost serve`` option, and every exit code of the service, appears in vmhost(8)."""
    page = _man_text(MAN / "vmhost.8")
    options = set(re.findall(r"--[a-z][a-z-]+", _help(cli.vmhost_main, "serve", capsys=capsys)))
    assert {"--config", "--socket", "--state-dir", "--pid-file"} <= options
    for option in options - {"--help"}:
        assert option in page, option
    from vmhost import service

    codes = {v for k, v in vars(service).items() if k.startswith("EXIT_") and isinstance(v, int)}
    documented = {int(c) for c in re.findall(r"^\.B (\d+)$", page, re.MULTILINE)}
    assert documented == codes


def test_changelog_is_at_the_package_version() -> None:
    """debian/changelog, what dpkg-buildpackage, debuild and gbp take the version from, agrees
    with vmhost.__version__ (the one source, which build-deb and the wheel use)."""
    fields = subprocess.run(
        ["dpkg-parsechangelog", "-l", str(REPO / "packaging/debian/changelog")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    parsed = dict(line.split(": ", 1) for line in fields.splitlines() if ": " in line)
    assert (parsed["Source"], parsed["Version"]) == ("vmhost", vmhost.__version__)


# -- the built package ---------------------------------------------------------


def _source_hash() -> str:
    """Over what build-deb builds from (its own list), so any change there rebuilds."""
    inputs = subprocess.run(
        ["bash", str(BUILD_DEB), "--inputs"], capture_output=True, text=True, check=True
    ).stdout.split()
    digest = hashlib.sha256()
    for name in inputs:
        digest.update(name.encode() + b"\0" + (REPO / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _build(key: str, source: Path = REPO) -> Path:
    """The .deb build-deb makes from ``source``, cached under ``key`` (about a minute, lintian
    included); build-deb fails on any lintian error or warning no override explains, so a
    cached package is also a lintian-clean one."""
    target = DEB_CACHE / key
    DEB_CACHE.mkdir(parents=True, exist_ok=True)
    with open(DEB_CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may build the same package
        if not target.is_dir():
            with tempfile.TemporaryDirectory(dir=DEB_CACHE, prefix=".build-") as tmp:
                started = time.monotonic()
                build = subprocess.run(
                    ["bash", str(source / "packaging/build-deb"), tmp],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                assert build.returncode == 0, (
                    f"build-deb failed:\n{build.stdout[-6000:]}\n{build.stderr[-3000:]}"
                )
                print(f"\nbuild-deb: {time.monotonic() - started:.0f} s")
                current = key.split("-")[0]
                for old in DEB_CACHE.iterdir():
                    if old.is_dir() and not old.name.startswith((".", current)):
                        shutil.rmtree(old)
                os.rename(tmp, target)
    (package,) = target.glob("vmhost_*.deb")
    return package


@pytest.fixture(scope="module")
def deb() -> Path:
    """The .deb of this source tree, built once per source hash."""
    return _build(_source_hash())


UPGRADE_VERSION = f"{vmhost.__version__}+upgrade1"


@pytest.fixture(scope="module")
def newer_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same source as a newer version: what an upgrade installs."""
    source = tmp_path_factory.mktemp("newer")
    for name in subprocess.run(
        ["bash", str(BUILD_DEB), "--inputs"], capture_output=True, text=True, check=True
    ).stdout.split():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    init = source / "vmhost/__init__.py"
    old = f'__version__ = "{vmhost.__version__}"'
    assert old in init.read_text()
    init.write_text(init.read_text().replace(old, f'__version__ = "{UPGRADE_VERSION}"'))
    changelog = source / "packaging/debian/changelog"
    text = changelog.read_text()
    signature = next(line for line in text.splitlines() if line.startswith(" -- "))
    maintainer = signature.rsplit(">", 1)[0] + ">"
    entry = f"vmhost ({UPGRADE_VERSION}) unstable; urgency=medium\n\n  * Upgrade test.\n\n"
    now = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())  # after the last entry
    changelog.write_text(f"{entry}{maintainer}  {now}\n\n{text}")
    return _build(f"{_source_hash()}-upgrade", source)


def _field(deb: Path, name: str) -> str:
    out = subprocess.run(["dpkg-deb", "--field", str(deb), name], capture_output=True, text=True)
    return out.stdout.strip()


@pytest.mark.slow
def test_package_metadata_and_layout(deb: Path) -> None:
    """Version is vmhost.__version__; promised files and Depends; no bytecode, pip, wheel libs."""
    assert _field(deb, "Version") == vmhost.__version__
    assert deb.name == f"vmhost_{vmhost.__version__}_{_field(deb, 'Architecture')}.deb"
    depends = {d.split()[0] for d in _field(deb, "Depends").split(", ")}
    assert {"python3.11", "qemu-system-x86", "systemd", "libsystemd0"} <= depends

    listing = subprocess.run(
        ["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    entries = {}
    for line in listing.splitlines():
        path, _, target = line.split(maxsplit=5)[5].partition(" -> ")
        entries[path.removeprefix(".")] = target
    for path in (
        *UNITS,
        "/usr/lib/systemd/catalog/vmhost.catalog",
        "/usr/lib/sysusers.d/vmhost.conf",
        "/usr/share/doc/vmhost/examples/demo.toml",
        "/usr/share/man/man1/vmhostctl.1.gz",
        "/usr/share/man/man8/vmhost.8.gz",
        f"{VENV}/bin/vmhost",
        f"{VENV}/bin/vmhostctl",
    ):
        assert path in entries, path
    for command in ("vmhost", "vmhostctl"):
        assert entries[f"/usr/bin/{command}"] == f"{VENV}/bin/{command}"
    agent = next(line for line in listing.splitlines() if line.endswith(f" .{OCF_AGENT}"))
    assert agent.startswith("-rwxr-xr-x"), agent  # Pacemaker runs it
    assert {"pacemaker", "resource-agents"} <= set(_field(deb, "Suggests").split(", "))
    assert not [p for p in entries if "__pycache__" in p or p.endswith(".pyc")]
    assert not [p for p in entries if ".libs/" in p], "a wheel's bundled shared libraries"
    assert not [p for p in entries if re.search(r"/site-packages/(pip|setuptools)/", p)]


# -- installed in a real systemd -----------------------------------------------


@contextlib.contextmanager
def _overlay(guest: GuestImage, *debs: Path) -> Iterator[Container]:
    """The host's own OS booted under a throwaway overlay, packages and the guest bound in."""
    try:
        container.require_host()
    except ContainerUnavailable as e:
        prerequisite_missing(f"cannot start a systemd container here: {e}")
    binds = [f"{d.parent}:/run/deb{i or ''}" for i, d in enumerate(debs)]
    binds.append(f"{guest.kernel.parent}:/run/guest")
    with container.boot(
        "vmhost-deb", overlay=True, ro_binds=binds, masks=["postgresql.service"]
    ) as ct:
        # Image-build hosts forbid maintainer scripts to start or stop services (a
        # policy-rc.d exiting 101, which deb-systemd-invoke obeys); a booted system has none.
        ct.run("rm", "-f", "/usr/sbin/policy-rc.d")
        yield ct


@pytest.fixture
def overlay_host(deb: Path, guest: GuestImage) -> Iterator[Container]:
    with _overlay(guest, deb) as ct:
        yield ct


def _wait_ready(ct: Container, console: str, boots: int, timeout: float = 60) -> None:
    """Until the guest said READY ``boots`` times in its console log (vmhost appends to it)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = ct.run("grep", "-cF", "TINYGUEST READY", console, check=False).stdout.strip()
        if seen and int(seen) >= boots:
            return
        assert time.monotonic() < deadline, f"{seen or 0} READY in {console} after {timeout} s"
        time.sleep(0.2)


def _apt(ct: Container, *args: str) -> None:
    ct.run("env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-q", "-y", *args, timeout=300)


def _boots(ct: Container, disk: str) -> list[str]:
    """The guest appends its token to /marker at each boot: what the disk says happened."""
    return ct.run("debugfs", "-R", "cat /marker", disk).stdout.split()


def _unmounted_cleanly(ct: Container, disk: str) -> bool:
    return "needs_recovery" not in ct.run("dumpe2fs", "-h", disk).stdout


def _demo_vm(ct: Container) -> tuple[str, str, str]:
    """VM demo as an operator sets it up: files in its state directory, config in /etc.

    Returns its disk, its console log and the token its guest writes at each boot.
    """
    state = "/var/lib/vmhost/demo"
    disk, console = f"{state}/disk.img", f"{state}/console.log"
    token = f"deb-{os.urandom(4).hex()}"
    # A VM the host ran (scripts/demo) shows through the overlay: start from none.
    ct.run("rm", "-rf", "/etc/vmhost", "/var/lib/vmhost")
    ct.run("mkdir", "-p", state)
    ct.run("cp", "/run/guest/vmlinuz", "/run/guest/initrd.img", state)
    ct.run("cp", "--sparse=always", "/run/guest/disk.img", disk)
    ct.write(
        "/etc/vmhost/demo.toml",
        f"""\
[machine]
accel = "tcg"
[boot]
kernel = "{state}/vmlinuz"
initrd = "{state}/initrd.img"
cmdline = "console=ttyS0 quiet panic=-1 guest.token={token}"
[[disks]]
path = "{disk}"
[network]
ssh_port = {free_port()}
[stop]
timeout_seconds = 20
""",
    )
    ct.systemctl("enable", "vmhost@demo.socket")
    return disk, console, token


@pytest.mark.slow
def test_install_run_remove_purge(overlay_host: Container, deb: Path) -> None:
    """apt install; vmhost@demo runs, stop powers it off; remove stops VMs; purge leaves nothing."""
    ct = overlay_host
    _apt(ct, "install", "--no-install-recommends", f"/run/deb/{deb.name}")

    # Installed: template units known to systemd, none enabled or running; the catalog compiled.
    files = ct.systemctl("list-unit-files", "--no-legend", "vmhost@*").stdout.split()
    assert files == [
        "vmhost@.service",
        "disabled",
        "enabled",
        "vmhost@.socket",
        "disabled",
        "enabled",
    ]
    assert ct.systemctl("list-units", "--all", "--no-legend", "vmhost@*").stdout == ""
    assert Event.READY.message_id in ct.run("journalctl", "--list-catalog").stdout
    assert ct.run("vmhostctl", "--version").stdout == f"vmhostctl {vmhost.__version__}\n"
    verify = ct.run("systemd-analyze", "verify", "vmhost@x.service", "vmhost@x.socket", check=False)
    assert (verify.returncode, verify.stderr) == (0, ""), verify.stderr

    disk, console, token = _demo_vm(ct)
    ct.systemctl("start", "vmhost@demo")
    status = ct.run("vmhostctl", "status", "demo").stdout
    assert status.startswith("demo: running\n"), status
    # The group that may use it was made on installation (sysusers.d).
    socket_owner = ct.run("stat", "-c", "%a %U %G", "/run/vmhost/demo/vmhost.sock").stdout
    assert socket_owner.split() == ["660", "root", "vmhost"]
    _wait_ready(ct, console, boots=1)

    started = time.monotonic()
    ct.systemctl("stop", "vmhost@demo")
    stop_seconds = time.monotonic() - started
    props = ct.show("vmhost@demo.service", "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    assert stop_seconds < 10, f"stop took {stop_seconds:.1f} s: the guest ignored ACPI"
    assert _boots(ct, disk) == [token]
    assert _unmounted_cleanly(ct, disk), "the guest did not power off by itself"

    # An upgrade (here a reinstall) leaves a running VM alone.
    ct.systemctl("start", "vmhost@demo")
    _wait_ready(ct, console, boots=2)
    pid = ct.show("vmhost@demo.service", "MainPID")
    _apt(ct, "install", "--reinstall", f"/run/deb/{deb.name}")
    assert ct.show("vmhost@demo.service", "MainPID") == pid
    assert ct.run("vmhostctl", "status", "demo").stdout.startswith("demo: running\n")

    # Removal while it runs: prerm shuts it down like systemctl stop.
    _apt(ct, "remove", "vmhost")
    assert _boots(ct, disk) == [token, token]
    assert _unmounted_cleanly(ct, disk), "removal killed the VM instead of shutting it down"
    assert ct.run("pgrep", "-f", "qemu-system", check=False).stdout == ""

    left = ct.run(
        "sh", "-c", f"ls -d {VENV} /usr/bin/vmhost* {' '.join(UNITS)} 2>/dev/null", check=False
    )
    assert left.stdout == "", f"left after remove: {left.stdout}"
    assert ct.systemctl("list-unit-files", "--no-legend", "vmhost@*", check=False).stdout == ""
    assert ct.run("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "vmhost").stdout.strip() == "rc"

    _apt(ct, "purge", "vmhost")
    assert ct.run("dpkg-query", "-W", "vmhost", check=False).returncode != 0
    links = ct.run("find", "/etc/systemd/system", "-name", "vmhost@*").stdout
    assert links == "", f"enablement links left after purge: {links}"
    assert Event.READY.message_id not in ct.run("journalctl", "--list-catalog").stdout
    # What the operator made stays: the VM's config and disk.
    ct.run("test", "-f", "/etc/vmhost/demo.toml")
    ct.run("test", "-f", disk)


def _info(ct: Container) -> dict[str, object]:
    return dict(json.loads(ct.run("vmhostctl", "info", "demo", "--json").stdout))


@pytest.mark.slow
def test_upgrade_reloads_running_vms(deb: Path, newer_deb: Path, guest: GuestImage) -> None:
    """apt install of a newer .deb: the running VM moves to the new vmhost, its guest untouched."""
    assert _field(newer_deb, "Version") == UPGRADE_VERSION
    with _overlay(guest, deb, newer_deb) as ct:
        _apt(ct, "install", "--no-install-recommends", f"/run/deb/{deb.name}")
        disk, console, token = _demo_vm(ct)
        ct.systemctl("start", "vmhost@demo")
        _wait_ready(ct, console, boots=1)
        unit = "vmhost@demo.service"
        before = ct.show(unit, "MainPID", "NRestarts", "InvocationID")
        children = f"/proc/{before['MainPID']}/task/{before['MainPID']}/children"
        qemu = ct.run("cat", children).stdout.split()
        assert len(qemu) == 1
        assert _info(ct)["version"] == vmhost.__version__

        _apt(ct, "install", "--no-install-recommends", f"/run/deb1/{newer_deb.name}")
        assert ct.run("vmhostctl", "--version").stdout == f"vmhostctl {UPGRADE_VERSION}\n"
        # systemd 252 ends `systemctl reload` once the signal is sent, not when vmhost is back.
        deadline = time.monotonic() + 30
        while (info := _info(ct))["version"] != UPGRADE_VERSION:
            assert time.monotonic() < deadline, info
            time.sleep(0.1)
        assert info["state"] == "running"
        assert ct.show(unit, "MainPID", "NRestarts", "InvocationID") == before
        assert ct.show(unit, "ActiveState", "SubState") == {
            "ActiveState": "active",
            "SubState": "running",
        }
        assert ct.run("cat", children).stdout.split() == qemu
        reloaded = ct.journal("VMHOST_VM=demo", f"MESSAGE_ID={Event.RELOADED.message_id}")
        (record,) = reloaded
        assert f"{vmhost.__version__} -> {UPGRADE_VERSION}" in record["MESSAGE"], record
        print(f"\n{record['MESSAGE']}")

        ct.systemctl("stop", unit)
        assert _boots(ct, disk) == [token]
        assert _unmounted_cleanly(ct, disk)
