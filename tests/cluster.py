"""A 3-node Pacemaker + Corosync cluster of systemd containers running vmhost VMs.

The recipe is the verified one of docs/test-infra.md ("A Pacemaker + Corosync
cluster of containers"): nodes are tests/container.py's containers (the host's
own /usr, a volatile /etc and /var), sharing the host's network; corosync
binds each node's own loopback address.  Only what a real node has differs:
- shared storage is one host directory bound into every node at /srv/vmhost
  (the kernel, the initrd and the disks live there);
- /etc/vmhost, the VMs' configs, is one host directory too: the same
  NAME.toml on every node;
- vmhost is the venv of tests/container.py and the units of units/, its
  commands on Pacemaker's PATH; the agent is bound where the .deb installs it.
- root on every node reaches the others by ssh (live migration's remote shell), by
  their names (one /etc/hosts) on port 2022 of each node's own address, with one
  key pair and one host key for all.
Fencing is disabled (stonith-enabled=false): a test cannot power-cycle a
container the way a fence device does a host.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from xml.etree import ElementTree

import container
from container import Container

SHARED: Final = "/srv/vmhost"
"""The shared storage's mount point on every node."""
AGENT: Final = "/usr/lib/ocf/resource.d/vmhost/vm"
NODES: Final = ("n1", "n2", "n3")
_UNITS: Final = ("units/vmhost@.socket", "units/vmhost@.service")
_PATH: Final = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_TMPFILES: Final = """\
d /var/lib/pacemaker 0755 root root -
d /var/lib/pacemaker/cib 0750 hacluster haclient -
d /var/lib/pacemaker/pengine 0750 hacluster haclient -
d /var/lib/pacemaker/blackbox 0750 hacluster haclient -
d /var/lib/pacemaker/cores 0750 hacluster haclient -
d /var/log/pacemaker 0770 hacluster haclient -
d /var/lib/corosync 0700 root root -
"""
SSH_PORT: Final = 2022
"""Apart from a host's own sshd on 22, which would hold every address of the loopback."""
_CIB_OPTIONS: Final = {"stonith-enabled": "false", "dc-deadtime": "2s"}
_STICKINESS: Final = """<rsc_defaults><meta_attributes id="rsc-options">
<nvpair id="rsc-options-stickiness" name="resource-stickiness" value="100"/>
</meta_attributes></rsc_defaults>"""


@dataclass
class Cluster:
    """The nodes by hostname, and the host directories they share."""

    nodes: dict[str, Container]
    shared: Path
    configs: Path
    venv: Path
    dead: set[str] = field(default_factory=set)

    def alive(self) -> list[Container]:
        return [ct for name, ct in self.nodes.items() if name not in self.dead]

    def ctl(self, node: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """vmhostctl on ``node``."""
        return self.nodes[node].run(f"{self.venv}/bin/vmhostctl", *args, check=check)

    def vm_state(self, node: str, vm: str) -> str:
        """The VM's state on ``node``: its unit's, or once active, what its socket answers."""
        ct = self.nodes[node]
        active = ct.systemctl("is-active", f"vmhost@{vm}.service", check=False).stdout.strip()
        if active != "active":
            return active
        out = self.ctl(node, "--json", "status", vm, check=False).stdout
        return out.partition('"vm_state":"')[2].partition('"')[0] or out

    def crm(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A Pacemaker command on a live node (any: the CIB is the cluster's)."""
        return self.alive()[0].run(*argv, check=check)

    def agent(
        self, node: str, action: str, name: str, **env: str
    ) -> subprocess.CompletedProcess[str]:
        """The agent run by hand on ``node``, as Pacemaker runs it."""
        variables = {"OCF_ROOT": "/usr/lib/ocf", "OCF_RESKEY_name": name, "PATH": self.path}
        variables |= {"OCF_RESKEY_CRM_meta_timeout": "30000", **env}
        return self.nodes[node].run(
            "env", *(f"{k}={v}" for k, v in variables.items()), AGENT, action, check=False
        )

    @property
    def path(self) -> str:
        return f"{self.venv}/bin:{_PATH}"

    def located(self, resource: str) -> list[str]:
        """The nodes Pacemaker says ``resource`` runs on."""
        out = self.crm("crm_resource", "--locate", "--quiet", "--resource", resource, check=False)
        return out.stdout.split()

    def wait_running(
        self, resource: str, vm: str, nodes: set[str], timeout: float = 90
    ) -> tuple[str, float]:
        """Wait until Pacemaker has ``resource`` started on one of ``nodes`` and the VM answers
        there; return that node and how long it took."""
        start = time.monotonic()
        where: list[str] = []
        while time.monotonic() - start < timeout:
            where = self.located(resource)
            if len(where) == 1 and where[0] in nodes and self.vm_state(where[0], vm) == "running":
                return where[0], time.monotonic() - start
            time.sleep(0.1)
        status = self.crm("crm_mon", "-1", "--include=failcounts", check=False).stdout
        where_ = " ".join(where) or "nowhere"
        raise AssertionError(
            f"{resource} not running on {sorted(nodes)} after {timeout} s: {where_}\n{status}"
        )

    def failures(self, resource: str) -> list[dict[str, str]]:
        """The failed operations crm_mon lists for ``resource`` (op_key, node, exitreason...)."""
        xml = self.crm("crm_mon", "-1", "--output-as=xml").stdout
        found = ElementTree.fromstring(xml).iterfind("failures/failure")
        return [dict(f.attrib) for f in found if f.get("op_key", "").startswith(f"{resource}_")]

    def kill(self, node: str) -> None:
        """The node dies: SIGKILL of its PID 1 (never of nspawn: its systemd would live on)."""
        self.dead.add(node)
        os.kill(self.nodes[node].pid, signal.SIGKILL)


def invocation(node: Container, vm: str) -> str:
    return node.show(f"vmhost@{vm}.service", "InvocationID")["InvocationID"]


def journal(node: Container, *matches: str) -> str:
    """The messages journalctl selects by ``matches`` (vmhost's and the guest console's)."""
    node.run("journalctl", "--sync")
    return node.run("journalctl", "--no-pager", "-o", "cat", *matches).stdout


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - start


@contextlib.contextmanager
def cluster(venv: Path, work: Path) -> Iterator[Cluster]:
    """Boot the nodes, wait until all are online with a DC; always tear them down."""
    names = [container.machine_name(n) for n in NODES]
    subnet = f"127.{os.getpid() >> 8 & 255}.{os.getpid() & 255}"  # apart from other sessions
    etc = _node_config(work / "etc", names, subnet, venv)
    shared, configs = work / "shared", work / "vmhost"
    shared.mkdir()
    configs.mkdir()
    ro_binds = [
        f"{etc / src}:{dst}"
        for src, dst in (
            ("corosync", "/etc/corosync"),
            ("libqb", "/etc/libqb"),
            ("sysusers.d", "/etc/sysusers.d"),
            ("tmpfiles.d", "/etc/tmpfiles.d"),
            ("corosync.service.d", "/etc/systemd/system/corosync.service.d"),
            ("pacemaker.service.d", "/etc/systemd/system/pacemaker.service.d"),
            ("resource.d", "/usr/lib/ocf/resource.d"),
        )
    ]
    ro_binds += [f"{configs}:/etc/vmhost", str(venv)]
    # A real node's /etc has these: alternatives (which, awk), and for ocf-tester's `su nobody`.
    ro_binds += ["/etc/alternatives", "/etc/pam.d", "/etc/security", "/etc/login.defs"]
    with contextlib.ExitStack() as stack:
        nodes = {}
        for name in NODES:
            ct = stack.enter_context(
                container.boot(
                    name,
                    binds=[f"{shared}:{SHARED}"],
                    ro_binds=ro_binds,
                    masks=["logd.service"],
                    cluster_node=True,
                )
            )
            ct.write(
                "/etc/systemd/system/vmhost@.service.d/shared.conf",
                f"[Service]\nReadWritePaths={SHARED}\n",
            )
            ct.install_units([container.REPO / u for u in _UNITS], venv)
            nodes[ct.name] = ct
        _ssh(nodes, subnet, etc / "ssh")
        booted = Cluster(nodes, shared, configs, venv)
        online = "Online: [ " + " ".join(names) + " ]"
        wait_for(
            "all nodes online with a DC",
            lambda: (
                online in (out := booted.crm("crm_mon", "-1", check=False).stdout)
                and "Current DC: n" in out
            ),
        )
        try:
            yield booted
        finally:
            # Resources stopped first: nodes halting one by one would move them about, and
            # each halt waits for that (20 s more in all).
            stop_all = ("-t", "crm_config", "-n", "stop-all-resources", "-v", "true")
            if booted.alive():
                booted.crm("crm_attribute", *stop_all, check=False)
                booted.crm("crm_resource", "--wait", "--timeout=60s", check=False)


def _ssh(nodes: dict[str, Container], subnet: str, keys: Path) -> None:
    """sshd on each node's own address; root's key and client config; the nodes' names."""
    keys.mkdir()
    for key in ("host", "root"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / key)], check=True
        )
    hosts = "".join(f"{subnet}.{10 + i} {name}\n" for i, name in enumerate(nodes, 1))
    client = (
        f"Host *\n Port {SSH_PORT}\n IdentityFile /root/.ssh/id_ed25519\n"
        " StrictHostKeyChecking no\n UserKnownHostsFile /dev/null\n LogLevel ERROR\n"
    )
    for i, ct in enumerate(nodes.values(), 1):
        ct.write("/etc/hosts", f"127.0.0.1 localhost\n{hosts}")
        ct.write(
            "/etc/ssh/sshd_config",
            f"ListenAddress {subnet}.{10 + i}:{SSH_PORT}\nHostKey /etc/ssh/host\n"
            "PermitRootLogin prohibit-password\nUsePAM yes\n",  # no: refuses a locked root
        )
        ct.write("/etc/ssh/host", (keys / "host").read_text())
        ct.write("/root/.ssh/id_ed25519", (keys / "root").read_text())
        ct.write("/root/.ssh/authorized_keys", (keys / "root.pub").read_text())
        ct.write("/root/.ssh/config", client)
        ct.run("chmod", "-R", "go-rwx", "/etc/ssh/host", "/root/.ssh")
        ct.systemctl("reset-failed", "ssh.service", check=False)
        ct.systemctl("restart", "ssh.service")


def _node_config(etc: Path, names: list[str], subnet: str, venv: Path) -> Path:
    """/etc files every node binds: one corosync.conf (a node finds itself by hostname)."""
    for d in ("corosync", "libqb", "sysusers.d", "tmpfiles.d", "corosync.service.d",
              "pacemaker.service.d", "resource.d/vmhost"):  # fmt: skip
        (etc / d).mkdir(parents=True)
    subprocess.run(
        ["corosync-keygen", "-k", str(etc / "corosync/authkey")], check=True, capture_output=True
    )
    nodelist = "".join(
        f" node {{\n  name: {n}\n  nodeid: {i}\n  ring0_addr: {subnet}.{10 + i}\n }}\n"
        for i, n in enumerate(names, 1)
    )
    (etc / "corosync/corosync.conf").write_text(
        "totem {\n version: 2\n cluster_name: vmhosttest\n transport: knet\n token: 1000\n"
        " crypto_cipher: aes256\n crypto_hash: sha256\n}\n"
        "logging {\n to_syslog: yes\n to_stderr: no\n}\n"
        "quorum {\n provider: corosync_votequorum\n}\n"
        f"nodelist {{\n{nodelist}}}\n"
    )
    # libqb's abstract sockets are shared by the whole network namespace: files instead,
    # in each node's own /tmp.
    (etc / "libqb/force-filesystem-sockets").touch()
    (etc / "corosync.service.d/libqb.conf").write_text("[Service]\nPrivateTmp=no\n")
    (etc / "pacemaker.service.d/vmhost.conf").write_text(
        f"[Service]\nEnvironment=PATH={venv}/bin:{_PATH}\n"
    )
    (etc / "sysusers.d/pacemaker.conf").write_text(
        'g haclient -\nu hacluster -:haclient "cluster user" /var/lib/pacemaker\n'
        'u sshd - "sshd privilege separation" /run/sshd\n'
    )
    shutil.copy(container.REPO / "units/sysusers.d/vmhost.conf", etc / "sysusers.d")
    shutil.copy(container.REPO / "ocf/vm", etc / "resource.d/vmhost/vm")
    (etc / "tmpfiles.d/pacemaker.conf").write_text(_TMPFILES + _seed_cib(etc))
    return etc


def _seed_cib(etc: Path) -> str:
    """The initial CIB, written offline and installed by tmpfiles as hacluster's."""
    cib = etc / "cib.xml"
    cib.write_text(
        subprocess.run(["cibadmin", "--empty"], capture_output=True, text=True, check=True).stdout
    )
    env = {**os.environ, "CIB_file": str(cib)}
    for name, value in _CIB_OPTIONS.items():
        subprocess.run(
            ["crm_attribute", "-t", "crm_config", "-n", name, "-v", value],
            env=env,
            check=True,
            capture_output=True,
        )
    subprocess.run(
        ["cibadmin", "-C", "-o", "configuration", "-X", _STICKINESS],
        env=env,
        check=True,
        capture_output=True,
    )
    xml = cib.read_text().replace("\n", "")
    return f"f /var/lib/pacemaker/cib/cib.xml 0600 hacluster haclient - {xml}\n"


def primitive(resource: str, vm: str, *, monitor: str = "5s", migrate: bool = False) -> str:
    """The resource's CIB XML, with the op timeouts the README recommends; ``migrate``: moved
    live (allow-migrate), a failed live move blocking the resource where it runs."""
    meta = (
        f'<meta_attributes id="{resource}-meta"><nvpair id="{resource}-allow-migrate"'
        ' name="allow-migrate" value="true"/></meta_attributes>'
        if migrate
        else ""
    )
    ops = (
        f'<op id="{resource}-start" name="start" interval="0" timeout="60s"/>'
        f'<op id="{resource}-stop" name="stop" interval="0" timeout="40s"/>'
        f'<op id="{resource}-monitor" name="monitor" interval="{monitor}" timeout="30s"/>'
    )
    if migrate:
        ops += (
            f'<op id="{resource}-migrate_to" name="migrate_to" interval="0" timeout="120s"'
            ' on-fail="block"/>'
            f'<op id="{resource}-migrate_from" name="migrate_from" interval="0" timeout="60s"/>'
        )
    return (
        f'<primitive id="{resource}" class="ocf" provider="vmhost" type="vm">'
        f'<instance_attributes id="{resource}-params">'
        f'<nvpair id="{resource}-name" name="name" value="{vm}"/></instance_attributes>'
        f"{meta}<operations>{ops}</operations></primitive>"
    )


def tempdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="vmhost-cluster-"))
