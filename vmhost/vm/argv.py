"""Config -> QEMU command line and environment, as pure functions.

Everything QEMU needs is on its command line (``-nodefaults -no-user-config``:
no device or config file appears that the config did not ask for), and QEMU
talks to vmhost only through what it inherits, the QMP socket and the serial
console's pipe, and the guest agent's unix socket in the VM's state directory.
The probes with I/O are :func:`kvm_usable`, for ``accel = "auto"``, and
:func:`slirp_guard`, which finds the library QEMU preloads.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from ..config import Config
from ..errors import ControllerError
from ..machined import machine_uuid
from .readiness import NOTIFY_PORT

AGENT_GUEST_PORT: Final = 1024
SSH_GUEST_PORT: Final = 22
SANDBOX: Final = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
DEFAULT_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_KEPT_ENV: Final = frozenset({"PATH", "HOME", "TMPDIR", "LANG", "LANGUAGE", "TZ"})


def argv(
    config: Config,
    *,
    name: str,
    qmp_fd: int,
    console_fd: int,
    kvm: bool,
    held: bool = False,
    incoming: bool = False,
    console_input_fd: int = -1,
    notify_fd: int | None = None,
) -> list[str]:
    """The full QEMU command line; ``qmp_fd``, ``console_fd``, ``console_input_fd`` and
    ``notify_fd`` (if given) must be passed to the child.

    The console is a pipe's write end, not a socket: QEMU writes the serial
    port a byte at a time, and a pipe packs those bytes into pages where a
    socket queues one buffer per byte, which made reading them most of
    vmhost's CPU for a chatty guest.  Set non-blocking, it holds QEMU back
    (losslessly) when full.  QEMU takes it as a file from an fd set.  The
    console's input, another pipe's read end, joins it once QMP is up
    (:func:`console_with_input`): QEMU 7.2 has no command-line syntax for it.

    ``held`` starts QEMU with its vCPUs stopped (``-S``) until a QMP ``cont``.
    ``incoming`` makes it a live migration's target: its guest comes from the stream a
    QMP ``migrate-incoming`` listens for (:mod:`.migration`).
    There is deliberately no ``-no-reboot``: a guest that reboots keeps its VM.
    """
    machine = config.machine
    args = [
        config.qemu.binary,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-name",
        f"guest={_opt(name)},process=vmhost-{_opt(name)}",
        "-machine",
        f"q35,accel={'kvm' if kvm else 'tcg'}",
        # TCG refuses -cpu host; max is every feature TCG can emulate.
        "-cpu",
        "host" if kvm else "max",
        "-m",
        str(machine.memory_mib),
        "-smp",
        str(machine.cpus),
        "-uuid",  # SMBIOS: the guest's product_uuid is machinectl's Id
        str(machine_uuid(machine, name)),
    ]
    if config.boot is not None and config.boot.kernel:
        args += ["-kernel", config.boot.kernel, "-append", config.boot.cmdline]
        if config.boot.initrd:
            args += ["-initrd", config.boot.initrd]
    for disk in config.disks:
        drive = f"file={_opt(disk.path)},format={disk.format},if=virtio"
        args += ["-drive", drive + (",readonly=on" if disk.read_only else "")]
    # The agent has no TCP forward: the slirp guard forwards a unix socket to it (environment()).
    netdev = "user,id=net0"
    if config.network.ssh_port:
        netdev += (
            f",hostfwd=tcp:{config.network.ssh_address}:{config.network.ssh_port}-:{SSH_GUEST_PORT}"
        )
    args += ["-netdev", netdev, "-device", "virtio-net-pci,netdev=net0"]
    for i, share in enumerate(config.agent.shares):
        # The model is the config's (mapped-xattr unless "none" is named there): see ShareConfig.
        fsdev = f"local,id=fs{i},path={_opt(share.path)},security_model={share.security_model}"
        args += [
            "-fsdev",
            fsdev + (",readonly=on" if share.read_only else ""),
            "-device",
            f"virtio-9p-pci,fsdev=fs{i},mount_tag=share{i}",
        ]
    if console_input_fd >= 0:
        args += ["-add-fd", f"fd={console_input_fd},set={console_input_fd}"]
    args += [
        "-add-fd",
        f"fd={console_fd},set={console_fd}",
        "-chardev",
        f"file,id=serial0,path=/dev/fdset/{console_fd},append=on",  # append: a pipe has no truncate
        "-serial",
        "chardev:serial0",
        "-chardev",
        f"socket,id=qmp0,fd={qmp_fd},server=off",
        "-mon",
        "chardev=qmp0,mode=control",
    ]
    if notify_fd is not None:
        args += notify_args(notify_fd)
    if config.qemu.sandbox:
        args += ["-sandbox", SANDBOX]
    if held:
        args.append("-S")
    if incoming:
        args += ["-incoming", "defer"]
    return args + list(config.qemu.extra_args)


def console_with_input(console_fd: int, console_input_fd: int) -> dict[str, object]:
    """QMP ``chardev-change`` arguments that give the serial console its input pipe as well.

    The ``file`` backend reads ``in`` (``input-path=`` on the command line only
    from QEMU 8.1) and still writes ``out``, the same output pipe: the serial
    port keeps its chardev, the guest notices nothing.
    """
    data = {"in": f"/dev/fdset/{console_input_fd}", "out": f"/dev/fdset/{console_fd}"}
    return {"id": "serial0", "backend": {"type": "file", "data": {**data, "append": True}}}


def notify_args(fd: int) -> list[str]:
    """The guest's notify port (virtio-serial ``org.vmhost.notify.0``) on a connected socket
    QEMU inherits as ``fd``: like QMP, a channel only vmhost holds, with no path to open."""
    return [
        "-device",
        "virtio-serial-pci,id=vmhost-serial",
        "-chardev",
        f"socket,id=notify0,fd={fd},server=off",
        "-device",
        f"virtserialport,bus=vmhost-serial.0,chardev=notify0,name={NOTIFY_PORT}",
    ]


def _opt(value: str) -> str:
    """Quote a value inside a QEMU ``key=value,...`` option, where ``,`` is the separator."""
    return value.replace(",", ",,")


def kvm_usable(dev: Path = Path("/dev/kvm"), modules: Path = Path("/sys/module")) -> bool:
    """Whether KVM can run a stock guest here.

    Opening /dev/kvm is not enough: a nested ``kvm_pvm`` provides it but
    aborts or crawls on a normal kernel, so a hardware module must be loaded.
    """
    try:
        os.close(os.open(dev, os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return (modules / "kvm_intel").exists() or (modules / "kvm_amd").exists()


def accel_is_kvm(config: Config) -> bool:
    accel = config.machine.accel
    return accel == "kvm" or (accel == "auto" and kvm_usable())


def environment(
    parent: Mapping[str, str], *, host_loopback: bool = False, agent_socket: Path | None = None
) -> dict[str, str]:
    """QEMU's environment, built from an allowlist, with the slirp guard preloaded.

    vmhost itself runs with systemd's LISTEN_*, NOTIFY_SOCKET, WATCHDOG_* and
    INVOCATION_ID; QEMU inheriting them could answer systemd in vmhost's name.
    The guard (vmhost/slirp_guard.c) stops guests reaching the host's loopback
    unless ``host_loopback``, and forwards ``agent_socket`` to the guest agent.
    """
    env = {k: v for k, v in parent.items() if k in _KEPT_ENV or k.startswith("LC_")}
    env.setdefault("PATH", DEFAULT_PATH)
    env["LD_PRELOAD"] = slirp_guard()
    if host_loopback:
        env["VMHOST_SLIRP_HOST_LOOPBACK"] = "1"
    if agent_socket is not None:
        env["VMHOST_SLIRP_AGENT_SOCKET"] = str(agent_socket)
    return env


def agent_socket(state_dir: Path) -> Path:
    """Where QEMU listens for vmhost's agent connection: the VM's private state directory."""
    return state_dir / "agent.sock"


def slirp_guard() -> str:
    """The guard library's path; missing, QEMU would run without it, so that is an error."""
    spec = importlib.util.find_spec("vmhost._slirp_guard")
    if spec is None or spec.origin is None or not os.path.isfile(spec.origin):
        raise ControllerError(
            "the slirp guard (vmhost/_slirp_guard*.so, built with vmhost from slirp_guard.c) "
            "is missing: without it guests reach the host's loopback and the agent has no "
            "private channel; reinstall vmhost"
        )
    return spec.origin
