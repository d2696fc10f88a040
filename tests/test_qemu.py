"""The QEMU command line and environment, checked as data and against a real QEMU."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal

import pytest
from conftest import VM, bare_qemu, free_port
from fixtures import ENV
from qemu.qmp import QMPClient

from vmhost import config as vmconfig
from vmhost.config import (
    AgentConfig,
    BootConfig,
    Config,
    DiskConfig,
    MachineConfig,
    NetworkConfig,
    QemuConfig,
    ShareConfig,
)
from vmhost.errors import ControllerError
from vmhost.vm import argv as qemu_argv
from vmhost.vm.controller import QemuController
from vmhost.vm.state import VMState

DISK_ONLY = Config(disks=[DiskConfig(path="/vm/disk.img")])


def option(args: list[str], flag: str) -> list[str]:
    """Every value given to ``flag``, in order."""
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_argv_minimal_tcg() -> None:
    """A disk-only config gives exactly the expected command line, sandboxed, without -no-reboot."""
    args = qemu_argv.argv(DISK_ONLY, name="demo", qmp_fd=5, console_fd=6, kvm=False)
    assert args == [
        "qemu-system-x86_64",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-name",
        "guest=demo,process=vmhost-demo",
        "-machine",
        "q35,accel=tcg",
        "-cpu",
        "max",
        "-m",
        "256",
        "-smp",
        "1",
        "-uuid",
        "c2fc1deb-03d4-5ce5-9e02-0d906229289b",  # uuid5(machined.NAMESPACE, "demo"), never changes
        "-drive",
        "file=/vm/disk.img,format=raw,if=virtio",
        "-netdev",
        "user,id=net0",
        "-device",
        "virtio-net-pci,netdev=net0",
        "-add-fd",
        "fd=6,set=6",
        "-chardev",
        "file,id=serial0,path=/dev/fdset/6,append=on",
        "-serial",
        "chardev:serial0",
        "-chardev",
        "socket,id=qmp0,fd=5,server=off",
        "-mon",
        "chardev=qmp0,mode=control",
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]


def test_argv_console_input_joins_an_fd_set() -> None:
    """The console's input pipe is passed as an fd set of its own; the serial chardev keeps
    writing the output pipe and takes the input through ``chardev-change`` once QMP is up."""
    plain = qemu_argv.argv(DISK_ONLY, name="demo", qmp_fd=5, console_fd=6, kvm=False)
    args = qemu_argv.argv(
        DISK_ONLY, name="demo", qmp_fd=5, console_fd=6, console_input_fd=7, kvm=False
    )
    assert option(args, "-add-fd") == ["fd=7,set=7", "fd=6,set=6"]
    at = args.index("fd=7,set=7")
    assert args[: at - 1] + args[at + 1 :] == plain
    assert qemu_argv.console_with_input(6, 7) == {
        "id": "serial0",
        "backend": {
            "type": "file",
            "data": {"in": "/dev/fdset/7", "out": "/dev/fdset/6", "append": True},
        },
    }


def test_argv_kvm_uses_host_cpu() -> None:
    """With KVM the machine and CPU model change, nothing else."""
    tcg = qemu_argv.argv(DISK_ONLY, name="demo", qmp_fd=5, console_fd=6, kvm=False)
    kvm = qemu_argv.argv(DISK_ONLY, name="demo", qmp_fd=5, console_fd=6, kvm=True)
    assert option(kvm, "-machine") == ["q35,accel=kvm"] and option(kvm, "-cpu") == ["host"]
    assert [a for a in kvm if a not in ("q35,accel=kvm", "host")] == [
        a for a in tcg if a not in ("q35,accel=tcg", "max")
    ]


def test_argv_full_config() -> None:
    """Kernel boot, several disks, both port forwards, shares, sizes and extra args all appear."""
    config = Config(
        machine=MachineConfig(cpus=2, memory_mib=512),
        boot=BootConfig(
            kernel="/vm/vmlinuz", initrd="/vm/initrd.img", cmdline="console=ttyS0 quiet"
        ),
        disks=[
            DiskConfig(path="/vm/a.img"),
            DiskConfig(path="/vm/b,c.qcow2", format="qcow2", read_only=True),
        ],
        network=NetworkConfig(ssh_port=2222),
        agent=AgentConfig(
            port=2223,
            shares=[
                ShareConfig(path="/srv/data", guest_path="/mnt/data"),
                ShareConfig(path="/srv/rw", guest_path="/mnt/rw", read_only=False),
                ShareConfig(path="/srv/raw", guest_path="/mnt/raw", security_model="none"),
            ],
        ),
        qemu=QemuConfig(binary="/opt/qemu", sandbox=False, extra_args=["-S", "-d", "guest_errors"]),
    )
    args = qemu_argv.argv(config, name="web", qmp_fd=3, console_fd=4, kvm=False)
    assert args[0] == "/opt/qemu"
    assert (option(args, "-m"), option(args, "-smp")) == (["512"], ["2"])
    assert option(args, "-kernel") == ["/vm/vmlinuz"]
    assert option(args, "-initrd") == ["/vm/initrd.img"]
    assert option(args, "-append") == ["console=ttyS0 quiet"]
    assert option(args, "-drive") == [
        "file=/vm/a.img,format=raw,if=virtio",
        "file=/vm/b,,c.qcow2,format=qcow2,if=virtio,readonly=on",
    ]
    # No TCP forward for the agent (port 2223): the slirp guard gives it a unix socket.
    assert option(args, "-netdev") == ["user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22"]
    assert option(args, "-fsdev") == [
        # Read-only and mapped unless the config says otherwise; "none" only by name.
        "local,id=fs0,path=/srv/data,security_model=mapped-xattr,readonly=on",
        "local,id=fs1,path=/srv/rw,security_model=mapped-xattr",
        "local,id=fs2,path=/srv/raw,security_model=none,readonly=on",
    ]
    assert option(args, "-device") == [
        "virtio-net-pci,netdev=net0",
        "virtio-9p-pci,fsdev=fs0,mount_tag=share0",
        "virtio-9p-pci,fsdev=fs1,mount_tag=share1",
        "virtio-9p-pci,fsdev=fs2,mount_tag=share2",
    ]
    assert "-sandbox" not in args and "-no-reboot" not in args
    assert args[-3:] == ["-S", "-d", "guest_errors"]


def test_argv_kernel_without_initrd() -> None:
    """An empty initrd means no -initrd at all, not an empty file name."""
    config = Config(boot=BootConfig(kernel="/vm/vmlinuz"))
    args = qemu_argv.argv(config, name="demo", qmp_fd=3, console_fd=4, kvm=False)
    assert option(args, "-kernel") == ["/vm/vmlinuz"] and "-initrd" not in args
    assert option(args, "-append") == ["console=ttyS0"] and "-drive" not in args


def test_argv_agent_port_opens_no_tcp_forward() -> None:
    """ssh_port = 0 forwards nothing to port 22; the agent port forwards nothing either."""
    config = Config(disks=DISK_ONLY.disks, agent=AgentConfig(port=5000))
    args = qemu_argv.argv(config, name="demo", qmp_fd=3, console_fd=4, kvm=False)
    assert option(args, "-netdev") == ["user,id=net0"]


@pytest.fixture
def fake_host(tmp_path: Path) -> tuple[Path, Path]:
    dev = tmp_path / "kvm"
    modules = tmp_path / "module"
    (modules / "kvm").mkdir(parents=True)
    return dev, modules


def test_kvm_usable_needs_device_and_hardware_module(fake_host: tuple[Path, Path]) -> None:
    """An openable /dev/kvm counts only with kvm_intel or kvm_amd loaded (kvm_pvm is not enough)."""
    dev, modules = fake_host
    assert not qemu_argv.kvm_usable(dev, modules)  # no device
    dev.write_bytes(b"")
    (modules / "kvm_pvm").mkdir()
    assert not qemu_argv.kvm_usable(dev, modules)
    (modules / "kvm_amd").mkdir()
    assert qemu_argv.kvm_usable(dev, modules)
    dev.unlink()
    dev.mkdir()  # cannot be opened read-write
    assert not qemu_argv.kvm_usable(dev, modules)


def test_kvm_usable_on_this_host_matches_modules() -> None:
    """The real probe says no wherever no hardware KVM module is loaded (kvm_pvm hosts included)."""
    hardware = any(Path("/sys/module", m).exists() for m in ("kvm_intel", "kvm_amd"))
    if hardware:
        pytest.skip("hardware KVM module loaded here")
    assert not qemu_argv.kvm_usable()


@pytest.mark.parametrize(
    ("accel", "usable", "expected"),
    [
        ("kvm", False, True),
        ("tcg", True, False),
        ("auto", True, True),
        ("auto", False, False),
    ],
)
def test_accel_is_kvm(
    monkeypatch: pytest.MonkeyPatch,
    accel: Literal["kvm", "tcg", "auto"],
    usable: bool,
    expected: bool,
) -> None:
    """An explicit accel is obeyed; auto asks the probe."""
    monkeypatch.setattr(qemu_argv, "kvm_usable", lambda: usable)
    config = Config(machine=MachineConfig(accel=accel))
    assert qemu_argv.accel_is_kvm(config) is expected


def test_environment_is_an_allowlist() -> None:
    """systemd's per-service variables never reach QEMU; locale, PATH and temp dirs do."""
    parent = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/root",
        "TMPDIR": "/var/tmp",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "TZ": "UTC",
        "LISTEN_FDS": "1",
        "LISTEN_PID": "42",
        "LISTEN_FDNAMES": "control",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "WATCHDOG_USEC": "1000",
        "WATCHDOG_PID": "42",
        "INVOCATION_ID": "abc",
        "JOURNAL_STREAM": "8:1",
        "LD_PRELOAD": "/tmp/evil.so",
    }
    kept = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/root",
        "TMPDIR": "/var/tmp",
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "TZ": "UTC",
    }
    guard = {"LD_PRELOAD": qemu_argv.slirp_guard()}
    assert qemu_argv.environment(parent) == {**kept, **guard}
    assert qemu_argv.environment(
        parent, host_loopback=True, agent_socket=Path("/s/agent.sock")
    ) == {
        **kept,
        **guard,
        "VMHOST_SLIRP_HOST_LOOPBACK": "1",
        "VMHOST_SLIRP_AGENT_SOCKET": "/s/agent.sock",
    }


def test_environment_always_has_path() -> None:
    """systemd may start us without PATH; QEMU still gets a sane one."""
    assert qemu_argv.environment({}) == {
        "PATH": qemu_argv.DEFAULT_PATH,
        "LD_PRELOAD": qemu_argv.slirp_guard(),
    }


def test_slirp_guard_is_built_and_wraps_slirp_new() -> None:
    """The guard QEMU preloads exists and defines slirp_new (nm: a text symbol)."""
    symbols = subprocess.run(
        ["nm", "-D", "--defined-only", qemu_argv.slirp_guard()], capture_output=True, text=True
    ).stdout
    assert re.search(r" T slirp_new$", symbols, re.M), symbols


_NO_GUARD: Final = """
import importlib.util, sys
find = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if "_slirp_guard" in name else find(name, *a)
from vmhost.cli import vmhost_main
vmhost_main(sys.argv[1:])
"""


def serve(vm: VM, *python: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``vmhost serve`` for ``vm`` as the service runs it, to its exit."""
    return subprocess.run(
        [sys.executable, *(python or ("-m", "vmhost")), "serve", "t", *vm.args()],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.mark.slow
def test_missing_slirp_guard_refuses_rather_than_runs_open(make_vm: Callable[..., VM]) -> None:
    """The service's own path: without the guard QEMU would run with the loopback open, so
    vmhost exits 4 at once, saying why (it used to hang until TimeoutStartSec)."""
    start = time.monotonic()
    done = serve(make_vm(), "-c", _NO_GUARD, timeout=30)
    assert done.returncode == 4, done.stderr
    assert re.search(r"slirp guard .* is missing", done.stderr), done.stderr
    assert time.monotonic() - start < 20


def _wrapper(tmp_path: Path, body: str) -> Path:
    """A ``qemu.binary`` script that runs the real QEMU after ``body``."""
    real = shutil.which("qemu-system-x86_64")
    assert real is not None
    script = tmp_path / "qemu-wrapper"
    script.write_text(f'#!/bin/sh\n{body}\nexec {real} "$@"\n')
    script.chmod(0o755)
    return script


@pytest.mark.slow
def test_qemu_without_the_guard_loaded_is_refused(
    make_vm: Callable[..., VM], tmp_path: Path
) -> None:
    """A wrapper that drops LD_PRELOAD runs QEMU without the guard: vmhost checks QEMU
    itself, held before the guest's first instruction, and exits 4 with the reason."""
    binary = _wrapper(tmp_path, "unset LD_PRELOAD")
    done = serve(make_vm(toml=f'[qemu]\nbinary = "{binary}"'))
    assert done.returncode == 4, done.stderr
    assert "the slirp guard is not loaded in QEMU" in done.stderr, done.stderr


@pytest.mark.slow
async def test_qemu_without_the_guard_runs_when_the_loopback_is_allowed(
    make_vm: Callable[..., VM], tmp_path: Path
) -> None:
    """With ``host_loopback = true`` there is nothing to defend: the VM runs, with a warning."""
    binary = _wrapper(tmp_path, "unset LD_PRELOAD")
    vm = make_vm(toml=f'[qemu]\nbinary = "{binary}"')
    vm.config.write_text(
        vm.config.read_text().replace("[network]", "[network]\nhost_loopback = true")
    )
    controller = QemuController(vmconfig.load(vm.config), name="t", state_dir=vm.dir)
    try:
        await controller.start()
        assert controller.state is VMState.RUNNING
    finally:
        await controller.close()


@pytest.mark.slow
async def test_a_slow_qemu_greeting_is_waited_for_within_the_start_budget(
    make_vm: Callable[..., VM], tmp_path: Path
) -> None:
    """QEMU greets on QMP only once its machine is built (-mem-prealloc of a big guest):
    past 5 s is fine within the start budget, and the service is told while it waits."""
    vm = make_vm(toml=f'[qemu]\nbinary = "{_wrapper(tmp_path, "sleep 7")}"')
    waits: list[float] = []
    controller = QemuController(
        vmconfig.load(vm.config),
        name="t",
        state_dir=vm.dir,
        start_timeout=60,
        on_start_wait=waits.append,
    )
    try:
        await controller.start()
        assert controller.state is VMState.RUNNING
    finally:
        await controller.close()
    assert len(waits) >= 2 and all(0 < left < 60 for left in waits), waits


@pytest.mark.slow
async def test_a_qemu_greeting_past_the_start_budget_fails_the_start(
    make_vm: Callable[..., VM], tmp_path: Path
) -> None:
    """The start budget bounds the wait: past it the start fails, QEMU is gone."""
    vm = make_vm(toml=f'[qemu]\nbinary = "{_wrapper(tmp_path, "sleep 30")}"')
    controller = QemuController(
        vmconfig.load(vm.config), name="t", state_dir=vm.dir, start_timeout=2
    )
    start = time.monotonic()
    try:
        with pytest.raises(ControllerError, match="QEMU failed to start"):
            await controller.start()
    finally:
        await controller.close()
    assert time.monotonic() - start < 10
    assert controller.state is VMState.ERROR


@pytest.fixture
def vm_files(tmp_path: Path) -> Config:
    """A config with every kind of device that boots nothing: QEMU is started with -S."""
    raw = tmp_path / "a,b.img"
    raw.write_bytes(b"\0" * 1024 * 1024)
    qcow = tmp_path / "b.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", qcow, "16M"], check=True)
    (tmp_path / "share").mkdir()
    return Config(
        machine=MachineConfig(memory_mib=64, accel="tcg"),
        disks=[
            DiskConfig(path=str(raw)),
            DiskConfig(path=str(qcow), format="qcow2", read_only=True),
        ],
        network=NetworkConfig(ssh_port=free_port()),
        agent=AgentConfig(
            port=free_port(),
            shares=[
                ShareConfig(path=str(tmp_path / "share"), guest_path="/mnt"),
                ShareConfig(
                    path=str(tmp_path / "share"),
                    guest_path="/rw",
                    read_only=False,
                    security_model="mapped-file",
                ),
            ],
        ),
        qemu=QemuConfig(extra_args=["-S"]),
    )


async def execute(qmp: QMPClient, command: str) -> Any:
    """qemu.qmp types every reply as ``object``; the tests index into them."""
    return await qmp.execute(command)


@pytest.mark.slow
async def test_real_qemu_accepts_argv_and_answers_qmp(vm_files: Config) -> None:
    """QEMU 7.2 takes every flag argv() emits, speaks QMP on the socketpair and quits cleanly."""
    config = vm_files
    agent = Path(config.disks[0].path).parent / "agent.sock"
    async with bare_qemu(config, "demo", agent_socket=agent) as vm:
        qmp, proc = vm.qmp, vm.proc
        async with asyncio.timeout(10):
            assert (await execute(qmp, "query-status"))["status"] == "prelaunch"
            assert await execute(qmp, "query-name") == {"name": "demo"}
            blocks = await execute(qmp, "query-block")
            assert [(b["inserted"]["file"], b["inserted"]["ro"]) for b in blocks] == [
                (config.disks[0].path, False),
                (config.disks[1].path, True),
            ]
            chardevs = {c["label"] for c in await execute(qmp, "query-chardev")}
            assert {"serial0", "qmp0"} <= chardevs
            comm = await asyncio.to_thread(Path(f"/proc/{proc.pid}/comm").read_text)
            assert comm == "vmhost-demo\n"
            _, writer = await asyncio.open_connection("127.0.0.1", config.network.ssh_port)
            writer.close()  # user networking listens on the forwarded ssh port
            _, writer = await asyncio.open_unix_connection(agent)
            writer.close()  # and, through the slirp guard, on the agent's socket
            with pytest.raises(ConnectionRefusedError):  # but not on any agent TCP port
                await asyncio.open_connection("127.0.0.1", config.agent.port)
            await qmp.execute("quit")
            assert await proc.wait() == 0
    assert vm.stderr == b""
