"""Security defences that need the real systemd (issue 19): credentials, config mode, trusted logs.

Runs in its own container, with the VM helpers of test_systemd_e2e.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import container
import pytest
from container import Container
from guest.build import GuestImage
from test_systemd_e2e import UNITS, VM, _free_port, make_vm, venv, wait_for

from vmhost.systemd import Event

__all__ = ["make_vm", "venv"]  # fixtures, used by name
pytestmark = pytest.mark.slow

NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--")


@pytest.fixture(scope="module")
def ct(venv: Path, guest: GuestImage) -> Iterator[Container]:
    binds = {container.REPO, venv, guest.kernel.parent}
    with container.boot("vmhost-sec", ro_binds=sorted(map(str, binds))) as booted:
        booted.install_units(UNITS, venv)
        yield booted


def append_config(vm: VM, text: str, mode: str = "0600") -> None:
    path = f"/etc/vmhost/{vm.name}.toml"
    vm.ct.run("sh", "-c", 'cat >>"$1" && chmod "$2" "$1"', "sh", path, mode, input=text)


def test_encrypted_credential_reaches_the_guest(make_vm: Callable[..., VM]) -> None:
    """systemd-creds encrypt, LoadCredentialEncrypted=, agent.credentials: the guest has it."""
    vm = make_vm("cred")
    port = _free_port()
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
