"""Security defences that need the real systemd (issue 19): credentials, config mode, trusted logs.

Runs in its own container, with the VM helpers of systemd_vm.py.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Final

import pytest
from conftest import free_port
from systemd_vm import VM, ct, make_vm, venv, wait_for

from vmhost.journal import Event

__all__ = ["ct", "make_vm", "venv"]  # fixtures, used by name
pytestmark = pytest.mark.slow

NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--")
P99_FLOOR: Final = 0.005
"""A flood's status p99 passes within 2x the quiet one or under 5 ms: with vmhost at 3-4% of a
core, 2.7-3.7 ms against a 0.4-1.1 ms quiet p99 came from two CPUs shared with a flooding TCG
guest and journald (2 of 4 full runs on 2026-12-06); the console read that took 70% of a core
made it seconds, and the CPU bound below catches that first."""


def append_config(vm: VM, text: str, mode: str = "0600") -> None:
    path = f"/etc/vmhost/{vm.name}.toml"
    vm.ct.run("sh", "-c", 'cat >>"$1" && chmod "$2" "$1"', "sh", path, mode, input=text)


def test_encrypted_credential_reaches_the_guest(make_vm: Callable[..., VM]) -> None:
    """systemd-creds encrypt, LoadCredentialEncrypted=, agent.credentials: the guest has it."""
    vm = make_vm("cred")
    port = free_port()
    vm.ct.run(
        "sh",
        "-c",
        "printf %s s3cr3t-value | systemd-creds encrypt --with-key=host --name=api_token - "
        "/etc/vmhost/cred.api_token.cred",
    )
    assert b"s3cr3t" not in vm.ct.run("cat", "/etc/vmhost/cred.api_token.cred").stdout.encode()
    vm.ct.write(
        f"/etc/systemd/system/{vm.unit}.d/credentials.conf",
        "[Service]\nLoadCredentialEncrypted=api_token:/etc/vmhost/cred.api_token.cred\n",
    )
    vm.ct.systemctl("daemon-reload")
    append_config(vm, f'[agent]\nport = {port}\ncredentials = ["api_token"]\n', mode="0644")
    vm.ct.systemctl("start", vm.unit)
    wait_for(
        "the agent to be provisioned",
        lambda: any("provisioned" in r["MESSAGE"] for r in vm.records()),
        timeout=120,
    )
    vm.ctl("stop", vm.name)  # the agent's shutdown copies what it received to the disk
    wait_for("stopped", lambda: vm.show("ActiveState")["ActiveState"] == "inactive")
    secret = vm.ct.run("debugfs", "-R", "cat /agent/secrets/api_token", vm.disk).stdout
    assert secret == "s3cr3t-value"
    assert "s3cr3t" not in vm.ct.run("cat", f"/etc/vmhost/{vm.name}.toml").stdout


def test_inline_secret_in_a_readable_config_exits_78(make_vm: Callable[..., VM]) -> None:
    """Inline secrets in a 0644 config: exit 78, not restarted, STATUS= names the file and mode."""
    vm = make_vm("leaky")
    append_config(vm, '[agent]\nsecrets = { token = "s3cr3t" }\n', mode="0644")
    assert vm.ct.systemctl("start", vm.unit, check=False).returncode != 0
    wait_for("failed", lambda: vm.show("ActiveState")["ActiveState"] == "failed")
    props = vm.show("ExecMainStatus", "NRestarts", "StatusText")
    assert (props["ExecMainStatus"], props["NRestarts"]) == ("78", "0"), props
    assert f"/etc/vmhost/{vm.name}.toml" in props["StatusText"], props
    assert "mode 0644" in props["StatusText"], props
    vm.ct.systemctl("reset-failed", vm.unit)
    vm.ct.run("chmod", "0600", f"/etc/vmhost/{vm.name}.toml")
    vm.ct.systemctl("start", vm.unit)  # the same file, private: starts
    assert vm.show("ActiveState")["ActiveState"] == "active"


def test_forged_journal_records_never_show_up(make_vm: Callable[..., VM]) -> None:
    """Records with VMHOST_VM= written by other users (logger, systemd-cat, sd_journal_send)
    or by root outside the unit are in the journal, but not in vmhostctl logs."""
    vm = make_vm("forged")
    vm.ct.systemctl("start", vm.unit)
    vm.wait_console()
    python = str(vm.venv / "bin/python")
    forge = (
        "from systemd import journal; journal.send('FORGED-{0}', VMHOST_VM='forged', "
        "SYSLOG_IDENTIFIER='{1}', VMHOST_EVENT='stopped', MESSAGE_ID='{2}')"
    )
    stopped = Event.STOPPED.message_id
    vm.ct.run(*NOBODY, python, "-c", forge.format("nobody", "vmhost", stopped))
    vm.ct.run(*NOBODY, python, "-c", forge.format("console", "vmhost-console", stopped))
    vm.ct.run(python, "-c", forge.format("root", "vmhost", stopped))
    vm.ct.run(*NOBODY, "logger", "--journald", input="MESSAGE=FORGED-logger\nVMHOST_VM=forged\n")
    vm.ct.run(*NOBODY, "systemd-cat", "-t", "vmhost", "echo", "FORGED-cat")
    forged = [r["MESSAGE"] for r in vm.records() if r["MESSAGE"].startswith("FORGED-")]
    assert sorted(forged) == [
        "FORGED-console",
        "FORGED-logger",
        "FORGED-nobody",
        "FORGED-root",
    ]  # fmt: skip  -- they are there to be found (systemd-cat sets no VMHOST_VM)
    local = vm.ctl("logs", vm.name, "-n", "1000").stdout
    remote = vm.ctl("--socket", vm.socket, "logs", "-n", "1000").stdout
    for out in (local, remote):
        assert "FORGED" not in out
        assert "vmhost-console: TINYGUEST READY" in out
        assert f"vmhost: starting VM {vm.name}" in out


# A good client: one status per connection every 5 ms; prints the latencies (s) once the
# console files have the text.
_STATUS_LATENCY = """
import json, socket, sys, time
path, console, text = sys.argv[1], sys.argv[2], sys.argv[3].encode()
def done():  # the text may already be in the rotated file
    found = False
    for name in (console, console + ".1"):
        try:
            with open(name, "rb") as f:
                found = found or text in f.read()
        except FileNotFoundError:
            pass
    return found
out = []
while len(out) % 20 or not done():
    start = time.perf_counter()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(b'{"method":"status"}\\n')
        s.makefile("rb").readline()
    out.append(time.perf_counter() - start)
    time.sleep(0.005)
print(json.dumps(out))
"""


def p99(samples: list[float]) -> float:
    return sorted(samples)[int(len(samples) * 0.99)]


def vmhost_cpu(vm: VM) -> float:
    """Seconds of CPU the unit's main process (vmhost, not QEMU) has used."""
    pid = vm.show("MainPID")["MainPID"]
    fields = vm.ct.run("cat", f"/proc/{pid}/stat").stdout.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def flood(make_vm: Callable[..., VM], name: str, seconds: int) -> None:
    """A guest printing at full speed for ``seconds``: status p99 within 2x of quiet, vmhost's
    CPU small, console files within their cap, every lifecycle record of vmhost in the journal,
    none suppressed."""
    vm = make_vm(name)
    config = f"/etc/vmhost/{vm.name}.toml"
    flags = f"guest.busy={seconds} guest.flood={seconds}"
    vm.ct.run("sed", "-i", f"s/guest.token=/{flags} guest.token=/", config)
    append_config(vm, "[console]\nfile_kib = 256\nfiles = 2\n")
    vm.ct.write("/run/sec/status_latency.py", _STATUS_LATENCY)
    vm.ct.systemctl("start", vm.unit)
    invocation = vm.show("InvocationID")["InvocationID"]
    vm.wait_console()
    console = f"/var/lib/vmhost/{vm.name}/console.log"
    client = ("/usr/bin/python3", "/run/sec/status_latency.py", vm.socket, console)
    # Quiet: the guest as busy as when flooding, but silent; so only the console differs.
    quiet = json.loads(vm.ct.run(*client, "BUSY DONE", timeout=seconds + 120).stdout)
    cpu_before, wall_before = vmhost_cpu(vm), time.monotonic()
    during = json.loads(vm.ct.run(*client, "FLOOD DONE", timeout=seconds + 120).stdout)
    cpu = (vmhost_cpu(vm) - cpu_before) / (time.monotonic() - wall_before)
    vm.ctl("stop", vm.name)
    wait_for("stopped", lambda: vm.show("ActiveState")["ActiveState"] == "inactive")

    sizes = vm.ct.run("sh", "-c", f"stat -c '%n %s' {console}*").stdout.split("\n")
    files = dict(line.rsplit(" ", 1) for line in sizes if line)
    assert set(files) == {console, f"{console}.1"}, files  # it rotated, and kept two
    assert all(int(size) <= 256 * 1024 for size in files.values()), files

    records = vm.records(f"_SYSTEMD_INVOCATION_ID={invocation}")
    events = [r.get("VMHOST_EVENT") for r in records if r.get("VMHOST_EVENT")]
    assert events == ["started", "ready", "stopping", "stopped"], events
    dropped = sum(
        int(r["VMHOST_CONSOLE_DROPPED"]) for r in records if "VMHOST_CONSOLE_DROPPED" in r
    )
    console_lines = sum(r["SYSLOG_IDENTIFIER"] == "vmhost-console" for r in records)
    suppressed = [
        r["MESSAGE"] for r in vm.ct.journal("_COMM=systemd-journal") if vm.unit in r["MESSAGE"]
    ]
    assert not suppressed, suppressed
    print(
        f"\nflood {seconds} s: {len(during)} status calls, p99 {p99(during) * 1e3:.2f} ms "
        f"(quiet {p99(quiet) * 1e3:.2f} ms); console lines: {console_lines} to the journal, "
        f"{dropped} counted as dropped; files {files}; vmhost's CPU {cpu:.0%} of a core"
    )
    assert dropped > console_lines  # the budget did the limiting, not journald
    assert cpu < 0.25  # reading the console a byte at a time took 70%
    assert p99(during) <= max(2 * p99(quiet), P99_FLOOR), (p99(during), p99(quiet))


def test_console_flood(make_vm: Callable[..., VM]) -> None:
    flood(make_vm, "flood", 10)


@pytest.mark.soak
def test_console_flood_30s(make_vm: Callable[..., VM]) -> None:
    flood(make_vm, "flood-soak", 30)
