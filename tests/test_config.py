"""Config loading: every bad file gives one message naming the file and the field."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import msgspec
import pytest

from vmhost import config, paths
from vmhost.config import (
    AgentConfig,
    BootConfig,
    Config,
    DiskConfig,
    MachineConfig,
    NetworkConfig,
    QemuConfig,
    ShareConfig,
    StopConfig,
    SystemdConfig,
)
from vmhost.errors import ConfigError

EXAMPLE = Path(__file__).parent.parent / "examples" / "demo.toml"

FULL = """\
[machine]
cpus = 2
memory_mib = 512
accel = "tcg"
uuid = "0f9d6c1e-7a53-4e0c-9b8e-2b4f6a1d3c5e"
[boot]
kernel = "vmlinuz"
initrd = "initrd.img"
cmdline = "console=ttyS0 quiet"
[[disks]]
path = "disk.img"
format = "raw"
read_only = false
[[disks]]
path = "/{dir}/data.qcow2"
format = "qcow2"
read_only = true
[network]
ssh_port = 2222
[agent]
port = 2223
config_file = "jcard.toml"
ssh_public_key = "ssh-ed25519 AAAA admin@host"
secrets = {{ token = "s3cret", other = "x" }}
shares = [{{ path = "share", guest_path = "/mnt/share", read_only = true }}]
[stop]
timeout_seconds = 10
max_timeout_seconds = 60
[qemu]
binary = "qemu-system-x86_64"
sandbox = false
extra_args = ["-S"]
[systemd]
register_machine = false
"""

MINIMAL = '[[disks]]\npath = "disk.img"\n'


@pytest.fixture
def vmdir(tmp_path: Path) -> Path:
    for name in ("vmlinuz", "initrd.img", "disk.img", "data.qcow2", "jcard.toml"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "share").mkdir()
    return tmp_path


def write(vmdir: Path, text: str, mode: int = 0o600) -> Path:
    path = vmdir / "vm.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(path)
    return str(info.value)


def test_full_config_loads_with_paths_resolved(vmdir: Path) -> None:
    """Every key is read, and relative paths are taken from the config's directory."""
    loaded = config.load(write(vmdir, FULL.format(dir=vmdir)))
    assert loaded == Config(
        machine=MachineConfig(
            cpus=2, memory_mib=512, accel="tcg", uuid=UUID("0f9d6c1e-7a53-4e0c-9b8e-2b4f6a1d3c5e")
        ),
        boot=BootConfig(
            kernel=f"{vmdir}/vmlinuz", initrd=f"{vmdir}/initrd.img", cmdline="console=ttyS0 quiet"
        ),
        disks=[
            DiskConfig(path=f"{vmdir}/disk.img"),
            DiskConfig(path=f"/{vmdir}/data.qcow2", format="qcow2", read_only=True),
        ],
        network=NetworkConfig(ssh_port=2222),
        agent=AgentConfig(
            port=2223,
            config_file=f"{vmdir}/jcard.toml",
            ssh_public_key="ssh-ed25519 AAAA admin@host",
            secrets={"token": "s3cret", "other": "x"},
            shares=[ShareConfig(path=f"{vmdir}/share", guest_path="/mnt/share", read_only=True)],
        ),
        stop=StopConfig(timeout_seconds=10, max_timeout_seconds=60),
        qemu=QemuConfig(sandbox=False, extra_args=["-S"]),
        systemd=SystemdConfig(register_machine=False),
    )
    assert msgspec.convert(msgspec.to_builtins(loaded), Config) == loaded


def test_defaults(vmdir: Path) -> None:
    """Omitted sections take the documented defaults: no boot, no agent, 30 s stop, sandbox on."""
    loaded = config.load(write(vmdir, MINIMAL))
    assert loaded == Config(disks=[DiskConfig(path=f"{vmdir}/disk.img")])
    assert (loaded.machine.cpus, loaded.machine.memory_mib, loaded.machine.accel) == (
        1,
        256,
        "auto",
    )
    assert loaded.boot is None and loaded.agent.port == 0 and loaded.network.ssh_port == 0
    assert loaded.stop.timeout_seconds == 30 and loaded.qemu.sandbox
    assert loaded.machine.uuid is None and loaded.systemd.register_machine


def test_relative_config_path_gives_absolute_paths(
    vmdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config named by a relative path still yields absolute file paths."""
    write(vmdir, MINIMAL)
    monkeypatch.chdir(vmdir)
    assert config.load(Path("vm.toml")).disks[0].path == f"{vmdir}/disk.img"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[machine]\ncpus = "two"\n', 'machine.cpus: expected int, got "two"'),
        ("[machine]\ncpus = 0\n", "machine.cpus: expected >= 1, got 0"),
        ("[machine]\nmemory_mib = 32\n", "machine.memory_mib: expected >= 64, got 32"),
        ("[machine]\nmemory_mib = 1.5\n", "machine.memory_mib: expected int, got 1.5"),
        (
            '[machine]\naccel = "xen"\n',
            'machine.accel: expected one of "auto", "kvm", "tcg", got "xen"',
        ),
        ("[network]\nssh_port = 70000\n", "network.ssh_port: expected <= 65535, got 70000"),
        ("[network]\nssh_port = -1\n", "network.ssh_port: expected >= 0, got -1"),
        ("[agent]\nport = 65536\n", "agent.port: expected <= 65535, got 65536"),
        ("[network]\nssh_prot = 22\n", "network.ssh_prot: unknown key"),
        ("[netwrok]\nssh_port = 22\n", "netwrok: unknown key"),
        ("network = 22\n", "network: expected table, got 22"),
        ("[[disks]]\nformat = 'raw'\n", "disks[0].path: required"),
        (
            "[[disks]]\npath = 'disk.img'\nformat = 'vmdk'\n",
            'disks[0].format: expected one of "qcow2", "raw", got "vmdk"',
        ),
        (
            "[[disks]]\npath = 'disk.img'\nread_only = 'no'\n",
            'disks[0].read_only: expected bool, got "no"',
        ),
        ("[boot]\ncmdline = ''\n", "boot.kernel: required"),
        ("[agent]\nsecrets = { a = 1 }\n", "agent.secrets[...]: expected str, got int"),
        (
            "[agent]\nshares = [{ path = '.', guest_path = '/x', mode = 1 }]\n",
            "agent.shares[0].mode: unknown key",
        ),
        ("[stop]\ntimeout_seconds = 0\n", "stop.timeout_seconds: expected >= 1, got 0"),
        ("[qemu]\nextra_args = '-S'\n", 'qemu.extra_args: expected array, got "-S"'),
        ('[machine]\nuuid = "nope"\n', 'machine.uuid: expected a UUID, got "nope"'),
        ("[machine]\nuuid = 5\n", "machine.uuid: expected uuid, got 5"),
        (
            '[systemd]\nregister_machine = "yes"\n',
            'systemd.register_machine: expected bool, got "yes"',
        ),
        ("[migration]\ntimeout_seconds = 0\n", "migration.timeout_seconds: expected >= 1, got 0"),
    ],
)
def test_bad_value_names_file_and_field(vmdir: Path, text: str, message: str) -> None:
    """A wrong type, range or key is reported as FILE: dotted.field: what was expected, got what."""
    path = write(vmdir, text)
    assert load_error(path) == f"{path}: {message}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[boot]\nkernel = "nope"\n', "boot.kernel: no such file or directory: {dir}/nope"),
        ('[boot]\nkernel = "share"\n', "boot.kernel: not a file: {dir}/share"),
        (
            '[boot]\nkernel = "vmlinuz"\ninitrd = "nope.img"\n',
            "boot.initrd: no such file or directory: {dir}/nope.img",
        ),
        (
            '[[disks]]\npath = "nope.img"\n',
            "disks[0].path: no such file or directory: {dir}/nope.img",
        ),
        (
            MINIMAL + '[[disks]]\npath = "/nope/b.img"\nread_only = true\n',
            "disks[1].path: no such file or directory: /nope/b.img",
        ),
        ("[machine]\ncpus = 1\n", "disks: nothing to boot: give [boot] or at least one [[disks]]"),
        (
            MINIMAL + "[network]\nssh_port = 2222\n[agent]\nport = 2222\n",
            "agent.port: 2222 is already network.ssh_port",
        ),
        (
            MINIMAL + '[agent]\nconfig_file = "nope.toml"\n',
            "agent.config_file: no such file or directory: {dir}/nope.toml",
        ),
        (
            MINIMAL + '[agent]\nshares = [{ path = "nope", guest_path = "/mnt" }]\n',
            "agent.shares[0].path: not a directory: {dir}/nope",
        ),
        (
            MINIMAL + '[agent]\nshares = [{ path = "share", guest_path = "mnt" }]\n',
            "agent.shares[0].guest_path: not an absolute path: 'mnt'",
        ),
        (
            MINIMAL + "[stop]\ntimeout_seconds = 61\nmax_timeout_seconds = 60\n",
            "stop.timeout_seconds: above stop.max_timeout_seconds (60)",
        ),
        (
            MINIMAL + '[qemu]\nbinary = "qemu-system-nonesuch"\n',
            "qemu.binary: not an executable or not in PATH: qemu-system-nonesuch",
        ),
        (
            MINIMAL + '[qemu]\nbinary = "disk.img"\n',
            "qemu.binary: not an executable or not in PATH: disk.img",
        ),
        (
            MINIMAL + '[network]\nssh_address = "host1"\n',
            "network.ssh_address: not an IP address: 'host1'",
        ),
        (
            MINIMAL + '[migration]\nlisten_address = "0.0.0.0:1"\n',
            "migration.listen_address: not an IP address: '0.0.0.0:1'",
        ),
    ],
)
def test_unusable_file_names_file_and_field(vmdir: Path, text: str, message: str) -> None:
    """A file the VM needs that is missing or of the wrong kind is reported by its field."""
    path = write(vmdir, text)
    assert load_error(path) == f"{path}: {message.format(dir=vmdir)}"


@pytest.fixture
def unwritable_disk(vmdir: Path) -> Iterator[Path]:
    """disk.img made unwritable even for root (immutable), or by mode for anyone else."""
    disk = vmdir / "disk.img"
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", disk], check=True)
        yield disk
        subprocess.run(["chattr", "-i", disk], check=True)
    else:
        disk.chmod(0o444)
        yield disk


def test_unwritable_disk_needs_read_only(vmdir: Path, unwritable_disk: Path) -> None:
    """A disk QEMU cannot write is refused unless the config says read_only = true."""
    path = write(vmdir, MINIMAL)
    assert load_error(path) == (
        f"{path}: disks[0].path: not writable (or set read_only = true): {unwritable_disk}"
    )
    write(vmdir, MINIMAL + "read_only = true\n")
    assert config.load(path).disks[0].read_only


def test_missing_config_file(tmp_path: Path) -> None:
    """A config that does not exist names the file and the OS reason."""
    path = tmp_path / "demo.toml"
    assert load_error(path) == f"{path}: cannot read: no such file or directory"


def test_toml_syntax_error_names_file_and_line(vmdir: Path) -> None:
    """TOML that does not parse gives the file and tomllib's line and column."""
    path = write(vmdir, "[machine]\ncpus = \n")
    assert load_error(path) == f"{path}: invalid TOML: Invalid value (at line 2, column 8)"


def test_example_config_is_complete() -> None:
    """examples/demo.toml has only known keys: off-host its one complaint is the kernel."""
    assert load_error(EXAMPLE) == (
        f"{EXAMPLE}: boot.kernel: no such file or directory: /var/lib/vmhost/demo/vmlinuz"
    )


@pytest.mark.parametrize("name", ["demo", "web-1", "a_b.c", "x:y@z", "A" * 64, "v1.2"])
def test_check_name_accepts(name: str) -> None:
    """Ordinary instance names pass unchanged and map to /etc/vmhost/NAME.toml."""
    assert config.check_name(name) == name
    assert paths.config_path(name, paths.CONFIG_DIR) == Path(f"/etc/vmhost/{name}.toml")


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "../etc", "a/b", "/etc/passwd", ".hidden", "-rf", "a b", "é", "a\n", "A" * 65],
)
def test_check_name_refuses_escapes(name: str, tmp_path: Path) -> None:
    """Names that could leave the config directory or mislead a command line are refused."""
    with pytest.raises(ConfigError, match="invalid VM name"):
        config.check_name(name)
    with pytest.raises(ConfigError, match="invalid VM name"):
        paths.config_path(name, tmp_path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_inline_secrets_in_a_readable_file_are_refused(vmdir: Path, mode: int) -> None:
    """Like ssh with a private key: group- or other-readable inline secrets stop the VM."""
    path = write(vmdir, MINIMAL + '[agent]\nsecrets = { token = "s3cret" }\n', mode)
    assert load_error(path) == (
        f"{path}: agent.secrets: inline secrets in a file readable by group or others "
        f"(mode {mode:04o}): chmod go-rwx {path}, or name systemd credentials in agent.credentials"
    )
    path.chmod(0o600)
    assert config.load(path).agent.secrets == {"token": "s3cret"}


def test_a_readable_file_without_secrets_loads(vmdir: Path) -> None:
    """Mode matters only when the file holds secrets: credentials are named, not written."""
    path = write(vmdir, MINIMAL + "[agent]\nsecrets = {}\ncredentials = []\n", 0o644)
    assert config.load(path).agent.secrets == {}


@pytest.fixture
def credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A $CREDENTIALS_DIRECTORY as systemd makes one for LoadCredential=."""
    directory = tmp_path / "credentials"
    directory.mkdir()
    (directory / "api_token").write_text("from-systemd\n")
    (directory / "db.pass").write_text("p")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(directory))
    return directory


def test_credentials_become_secrets(vmdir: Path, credentials: Path) -> None:
    """Each named credential is injected as the secret of that name, its bytes unchanged."""
    text = MINIMAL + '[agent]\nsecrets = { inline = "x" }\ncredentials = ["api_token", "db.pass"]\n'
    loaded = config.load(write(vmdir, text))
    assert loaded.agent.secrets == {"inline": "x", "api_token": "from-systemd\n", "db.pass": "p"}
    assert loaded.agent.credentials == ["api_token", "db.pass"]


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ('["nope"]', "agent.credentials[0]: credential 'nope': no such file or directory in {dir}"),
        ('["api_token", "../x"]', "agent.credentials[1]: not a credential name: '../x'"),
        ('[".hidden"]', "agent.credentials[0]: not a credential name: '.hidden'"),
        ('["inline"]', "agent.credentials[0]: 'inline' is also an inline secret"),
    ],
)
def test_bad_credentials_name_the_field(
    vmdir: Path, credentials: Path, names: str, message: str
) -> None:
    (credentials / "inline").write_text("y")
    text = MINIMAL + f'[agent]\nsecrets = {{ inline = "x" }}\ncredentials = {names}\n'
    path = write(vmdir, text)
    assert load_error(path) == f"{path}: {message.format(dir=credentials)}"


def test_credentials_outside_systemd(vmdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without $CREDENTIALS_DIRECTORY the message says which unit setting is missing."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    path = write(vmdir, MINIMAL + '[agent]\ncredentials = ["a", "b"]\n')
    assert load_error(path) == (
        f"{path}: agent.credentials: no $CREDENTIALS_DIRECTORY: give the unit "
        "LoadCredential= or SetCredentialEncrypted= for a, b"
    )
