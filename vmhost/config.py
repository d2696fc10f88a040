"""A VM's TOML config, decoded by msgspec into frozen Structs.

Other tools write these files, so the key names are an interface. Every
problem is reported as ONE :class:`ConfigError` naming the file and the dotted
field (``/etc/vmhost/demo.toml: network.ssh_port: expected <= 65535, got
70000``), because the first reader of that message is an operator looking at
``systemctl status``.  Files the VM needs are checked here, at load, so a typo
fails the unit before QEMU starts rather than as an obscure QEMU exit.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import stat
import tomllib
from pathlib import Path
from typing import Annotated, Final, Literal
from uuid import UUID

import msgspec

from .errors import ConfigError
from .tomlerrors import explain

MIN_MEMORY_MIB: Final = 64
"""Below this no Linux guest with an initrd gets to userspace."""

_Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
_CREDENTIAL: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@:-]{0,254}")
"""A credential is a file name in $CREDENTIALS_DIRECTORY: no path separators, no dot-first."""


class MachineConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    cpus: Annotated[int, msgspec.Meta(ge=1)] = 1
    memory_mib: Annotated[int, msgspec.Meta(ge=MIN_MEMORY_MIB)] = 256
    accel: Literal["kvm", "tcg", "auto"] = "auto"
    uuid: UUID | None = None
    """The SMBIOS UUID, also machined's; None: derived from the name (vmhost.machined)."""


ReadyMode = Literal["qemu", "agent", "notify", "ssh"]
DEFAULT_CMDLINE: Final = "console=ttyS0"


class BootConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Direct kernel boot (without ``kernel`` the VM boots from its first disk), and what
    "booted" means: when vmhost tells systemd READY=1.

    ``ready``: ``"qemu"`` once QEMU runs the guest; ``"agent"`` once the guest
    agent answered and provisioning finished; ``"notify"`` once the guest wrote
    ``READY=1`` to the virtio-serial port ``org.vmhost.notify.0``; ``"ssh"``
    once the forwarded SSH port answers with an ``SSH-`` banner.  A guest not
    ready within ``ready_timeout_seconds`` is stopped and the service fails.
    """

    kernel: str = ""
    initrd: str = ""
    cmdline: str = DEFAULT_CMDLINE
    ready: ReadyMode = "qemu"
    ready_timeout_seconds: Annotated[int, msgspec.Meta(ge=1)] = 300


class DiskConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    path: str
    format: Literal["raw", "qcow2"] = "raw"
    read_only: bool = False


class NetworkConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ssh_port: _Port = 0
    """Host ssh_address:ssh_port forwards to guest port 22; 0 means no forward."""
    ssh_address: str = "127.0.0.1"
    """The host address the SSH forward binds: a host's own, where hosts share a loopback
    (a migration's target binds it while the source still holds its own)."""
    host_loopback: bool = False
    """Let the guest reach the host's 127.0.0.1 through the gateway (QEMU's old default)."""


class ShareConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A host directory the agent mounts in the guest (virtio-9p tag ``shareN``).

    QEMU runs as root: with ``security_model = "none"`` a guest's chown/chmod
    land on the host as they are (a set-uid-root file included).  The mapped
    models keep the guest's owners and modes in xattrs (or hidden files) and
    create plain files owned by QEMU's user, so ``none`` is used only when a
    config asks for it by name.
    """

    path: str
    guest_path: str
    read_only: bool = True
    security_model: Literal["mapped-xattr", "mapped-file", "none"] = "mapped-xattr"


class AgentConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The in-guest agent (stereosd); ``port = 0`` means the guest has none.

    ``credentials`` names systemd credentials (``LoadCredential=``,
    ``SetCredentialEncrypted=``), each injected as the secret of that name;
    a loaded Config has their values merged into ``secrets``.  Inline
    ``secrets`` are refused in a file that group or others can read.
    """

    port: _Port = 0
    config_file: str = ""
    ssh_public_key: str = ""
    secrets: dict[str, str] = {}
    credentials: list[str] = []
    shares: list[ShareConfig] = []


class ConsoleConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The guest owns its serial console: what it may cost the host is capped here.

    ``console.log`` rotates at ``file_kib`` into ``files`` files at most
    (console.log, console.log.1, ...); at most ``journal_lines_per_second``
    lines (bursts of ten seconds' worth) go to the journal, the rest are
    counted and reported, so the unit's journald rate limit is never spent
    on the console and vmhost's own records are never the ones dropped.
    """

    file_kib: Annotated[int, msgspec.Meta(ge=64)] = 8192
    files: Annotated[int, msgspec.Meta(ge=2, le=100)] = 2
    journal_lines_per_second: Annotated[int, msgspec.Meta(ge=0)] = 50


class StopConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    timeout_seconds: Annotated[int, msgspec.Meta(ge=1)] = 30
    max_timeout_seconds: Annotated[int, msgspec.Meta(ge=1)] = 600
    """A client's ``timeout_seconds`` beyond this is clamped: systemd waits that long too."""


class QemuConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    binary: str = "qemu-system-x86_64"
    sandbox: bool = True
    extra_args: list[str] = []
    start_timeout_seconds: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 90
    """Until QEMU's QMP greeting, which comes once the machine is built: `-mem-prealloc`
    or a large hugepage guest takes long.  systemd is asked for the time (EXTEND_TIMEOUT_USEC)."""


class MigrationConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where this host, as a live migration's target, listens for the stream."""

    listen_address: str = "0.0.0.0"
    port: _Port = 49152
    timeout_seconds: Annotated[int, msgspec.Meta(ge=1)] = 300
    """The whole migration, on either end: then the source cancels, the target gives up."""
    downtime_limit_ms: Annotated[int, msgspec.Meta(ge=1)] = 300
    max_bandwidth_mib: Annotated[int, msgspec.Meta(ge=1)] = 1024
    """MiB/s the stream may take, so a migration does not starve the host's other traffic."""
    tls_server_creds: str = ""
    tls_client_creds: str = ""
    """Ids of ``tls-creds-x509`` objects in ``[qemu] extra_args`` (``endpoint=server`` to
    receive, ``endpoint=client`` to send): the stream is then TLS, its peer verified."""


class SystemdConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    register_machine: bool = True
    """Register the VM with systemd-machined (``machinectl``) when run as a systemd service."""


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One VM. File paths in a loaded Config are absolute."""

    machine: MachineConfig = MachineConfig()
    boot: BootConfig | None = None
    disks: list[DiskConfig] = []
    network: NetworkConfig = NetworkConfig()
    agent: AgentConfig = AgentConfig()
    console: ConsoleConfig = ConsoleConfig()
    stop: StopConfig = StopConfig()
    qemu: QemuConfig = QemuConfig()
    migration: MigrationConfig = MigrationConfig()
    systemd: SystemdConfig = SystemdConfig()


_NAME: Final = re.compile(r"[A-Za-z0-9_:@][A-Za-z0-9_.:@-]{0,63}")


def check_name(name: str) -> str:
    """Return ``name`` if it is safe as one path component, else raise ConfigError.

    systemd unescapes the instance (``vmhost@..%2fetc`` arrives as ``../etc``),
    so the name is untrusted input that ends up in ``/etc/vmhost/NAME.toml``.
    """
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"invalid VM name {name!r}: use 1 to 64 of A-Z a-z 0-9 _ . : @ -, "
            "not starting with . or -"
        )
    return name


def load(path: Path) -> Config:
    try:
        with path.open("rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            text = file.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {_reason(exc)}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {explain(str(exc), raw, Config)}") from exc
    if config.agent.secrets and mode & 0o044:
        # As ssh does with a private key: refuse rather than run with a leaked secret.
        raise ConfigError(
            f"{path}: agent.secrets: inline secrets in a file readable by group or others "
            f"(mode {stat.S_IMODE(mode):04o}): chmod go-rwx {path}, or name systemd "
            "credentials in agent.credentials"
        )
    config = _resolve(config, path.parent.absolute())
    problem = _check(config)
    if problem:
        raise ConfigError(f"{path}: {problem[0]}: {problem[1]}")
    return _with_credentials(config, path)


def _with_credentials(config: Config, path: Path) -> Config:
    """``agent.credentials`` read from ``$CREDENTIALS_DIRECTORY`` into ``agent.secrets``."""
    names = config.agent.credentials
    if not names:
        return config
    directory = os.environ.get("CREDENTIALS_DIRECTORY", "")
    if not directory:
        raise ConfigError(
            f"{path}: agent.credentials: no $CREDENTIALS_DIRECTORY: give the unit "
            f"LoadCredential= or SetCredentialEncrypted= for {', '.join(names)}"
        )
    secrets = dict(config.agent.secrets)
    for i, name in enumerate(names):
        field = f"agent.credentials[{i}]"
        if not _CREDENTIAL.fullmatch(name):
            raise ConfigError(f"{path}: {field}: not a credential name: {name!r}")
        if name in secrets:
            raise ConfigError(f"{path}: {field}: {name!r} is also an inline secret")
        try:
            secrets[name] = (Path(directory) / name).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"{path}: {field}: credential {name!r}: {_reason(exc)} in {directory}"
            ) from exc
    agent = msgspec.structs.replace(config.agent, secrets=secrets)
    return msgspec.structs.replace(config, agent=agent)


def _resolve(config: Config, base: Path) -> Config:
    def absolute(value: str) -> str:
        return str(base / value) if value else value

    replace = msgspec.structs.replace
    binary = config.qemu.binary
    boot = config.boot
    if boot is not None:
        boot = replace(boot, kernel=absolute(boot.kernel), initrd=absolute(boot.initrd))
    return replace(
        config,
        boot=boot,
        disks=[replace(d, path=absolute(d.path)) for d in config.disks],
        agent=replace(
            config.agent,
            config_file=absolute(config.agent.config_file),
            shares=[replace(s, path=absolute(s.path)) for s in config.agent.shares],
        ),
        # A bare command name is looked up in PATH; only a path is resolved.
        qemu=replace(config.qemu, binary=absolute(binary) if "/" in binary else binary),
    )


def _check(config: Config) -> tuple[str, str] | None:
    """The first unusable setting as (field, reason), in file order."""
    boot = config.boot or BootConfig()
    if boot.kernel:
        problem = _file_problem(boot.kernel, write=False)
        if problem:
            return "boot.kernel", problem
        problem = boot.initrd and _file_problem(boot.initrd, write=False)
        if problem:
            return "boot.initrd", problem
    elif boot.initrd or boot.cmdline != DEFAULT_CMDLINE:
        return "boot.kernel", "required"  # initrd and cmdline are the kernel's
    if boot.ready == "agent" and not config.agent.port:
        return "boot.ready", '"agent" needs a guest agent: set agent.port'
    if boot.ready == "ssh" and not config.network.ssh_port:
        return "boot.ready", '"ssh" needs an SSH forward: set network.ssh_port'
    if not boot.kernel and not config.disks:
        return "disks", "nothing to boot: give [boot] or at least one [[disks]]"
    for i, disk in enumerate(config.disks):
        problem = _file_problem(disk.path, write=not disk.read_only)
        if problem:
            return f"disks[{i}].path", problem
    for field, address in (
        ("network.ssh_address", config.network.ssh_address),
        ("migration.listen_address", config.migration.listen_address),
    ):
        try:
            ipaddress.ip_address(address)
        except ValueError:
            return field, f"not an IP address: {address!r}"
    ssh, agent = config.network.ssh_port, config.agent.port
    if agent and agent == ssh:
        return "agent.port", f"{agent} is already network.ssh_port"
    problem = config.agent.config_file and _file_problem(config.agent.config_file, write=False)
    if problem:
        return "agent.config_file", problem
    for i, share in enumerate(config.agent.shares):
        if not Path(share.path).is_dir():
            return f"agent.shares[{i}].path", f"not a directory: {share.path}"
        if not share.guest_path.startswith("/"):
            return f"agent.shares[{i}].guest_path", f"not an absolute path: {share.guest_path!r}"
    limit = config.stop.max_timeout_seconds
    if config.stop.timeout_seconds > limit:
        return "stop.timeout_seconds", f"above stop.max_timeout_seconds ({limit})"
    binary = config.qemu.binary
    if shutil.which(binary) is None:
        return "qemu.binary", f"not an executable or not in PATH: {binary}"
    return None


def _file_problem(path: str, *, write: bool) -> str:
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{_reason(exc)}: {path}"
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        return f"not a file: {path}"
    if not os.access(path, os.R_OK):
        return f"not readable: {path}"
    if write and not os.access(path, os.W_OK):
        return f"not writable (or set read_only = true): {path}"
    return ""


def _reason(exc: Exception) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return text[:1].lower() + text[1:]
