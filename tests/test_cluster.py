"""vmhost VMs as Pacemaker resources (issue 27): the ocf:vmhost:vm agent in a real 3-node
Pacemaker + Corosync cluster of systemd containers (tests/cluster.py), the real tiny guest
on shared storage.  Fencing is disabled there (see tests/cluster.py).

The tests share one cluster and run in file order: the node kill comes last.  Times are
printed (pytest -s shows them); the README's Cluster section quotes them.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import cluster
import container
import pytest
from cluster import Cluster, invocation, journal, wait_for
from container import ContainerUnavailable
from guest.build import GuestImage, fresh_disk

REPO = container.REPO
DTD = Path("/usr/share/resource-agents/ra-api-1.dtd")
OCF_ERR_GENERIC, OCF_ERR_INSTALLED, OCF_ERR_CONFIGURED, OCF_NOT_RUNNING = 1, 5, 6, 7
RECOVERY = "recovery complete"
"""The guest kernel's word for a replayed ext4 journal (loglevel 7: no `quiet`)."""


def config(name: str, token: str) -> str:
    return f"""\
[machine]
accel = "auto"
[boot]
kernel = "{cluster.SHARED}/vmlinuz"
initrd = "{cluster.SHARED}/initrd.img"
cmdline = "console=ttyS0 panic=-1 guest.token={token}"
[[disks]]
path = "{cluster.SHARED}/{name}.img"
[stop]
timeout_seconds = 20
"""


@pytest.fixture(scope="module")
def pcmk(guest: GuestImage) -> Iterator[Cluster]:
    """The cluster, with VM ``vm`` (resource ``vm``) created and running on one node."""
    for tool in ("corosync-keygen", "cibadmin", "ocf-tester", "xmllint"):
        if shutil.which(tool) is None:
            pytest.skip(f"no {tool}: bash scripts/setup packages installs the cluster stack")
    try:
        container.require_host()
        venv = container.venv()
    except ContainerUnavailable as e:
        pytest.skip(f"cannot start a systemd container here: {e}")
    work = cluster.tempdir()
    try:
        with cluster.cluster(venv, work) as booted:
            shutil.copy(guest.kernel, booted.shared / "vmlinuz")
            shutil.copy(guest.initrd, booted.shared / "initrd.img")
            for name in ("vm", "solo", "mig", "slow"):
                fresh_disk(guest, booted.shared / f"{name}.img")
                extra = {
                    "mig": "[agent]\nport = 1024\n",  # its uptime
                    "slow": "[agent]\nport = 1024\n[migration]\nmax_bandwidth_mib = 1\n"
                    "timeout_seconds = 3\n",  # a live move never finishes in time
                }.get(name, "")
                (booted.configs / f"{name}.toml").write_text(config(name, f"{name}-token") + extra)
            booted.crm("cibadmin", "-C", "-o", "resources", "-X", cluster.primitive("vm", "vm"))
            yield booted
    finally:
        shutil.rmtree(work)


def markers(pcmk: Cluster, name: str = "vm") -> list[str]:
    """The guest's /marker: one line per boot, read from the shared disk."""
    disk = pcmk.shared / f"{name}.img"
    out = subprocess.run(
        ["debugfs", "-R", "cat /marker", str(disk)], capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def test_meta_data_is_valid_ocf() -> None:
    """The agent's meta-data validates against resource-agents' ra-api-1.dtd."""
    if not DTD.exists() or shutil.which("xmllint") is None:
        pytest.skip("no resource-agents or xmllint: bash scripts/setup packages")
    meta = subprocess.run(
        [REPO / "ocf/vm", "meta-data"], capture_output=True, text=True, check=True
    )
    subprocess.run(
        ["xmllint", "--noout", "--nowarning", "--dtdvalid", str(DTD), "-"],
        input=meta.stdout, text=True, check=True,
    )  # fmt: skip
    assert '<parameter name="name" unique="1" required="1">' in meta.stdout


@pytest.mark.slow
def test_runs_on_one_node_and_passes_ocf_tester(pcmk: Cluster) -> None:
    """The VM runs on exactly one node, and ocf-tester passes the agent (on another VM)."""
    node, took = pcmk.wait_running("vm", "vm", set(pcmk.nodes))
    print(f"\nfirst start: vm running on {node} {took:.1f} s after the resource was created")
    for name, ct in pcmk.nodes.items():
        if name != node:
            assert pcmk.vm_state(name, "vm") == "inactive"
            assert ct.systemctl("is-active", "vmhost@vm.socket", check=False).stdout == "inactive\n"
    other = next(n for n in pcmk.nodes if n != node)
    tester = pcmk.nodes[other].run(
        "env", f"PATH={pcmk.path}", "ocf-tester", "-n", "solo", "-o", "name=solo", cluster.AGENT,
        check=False, timeout=300,
    )  # fmt: skip
    assert tester.returncode == 0, tester.stdout + tester.stderr
    assert "passed all tests" in tester.stdout
    assert pcmk.vm_state(other, "solo") == "inactive"


def run_log(pcmk: Cluster, node: str, run: str = "") -> str:
    """What one run of vmhost@vm on ``node`` logged, the guest's console included (the
    current run by default)."""
    return journal(
        pcmk.nodes[node], f"_SYSTEMD_INVOCATION_ID={run or invocation(pcmk.nodes[node], 'vm')}"
    )


def guest_ready(pcmk: Cluster, node: str) -> None:
    """Wait until the guest on ``node`` has written its marker and listens for ACPI (vmhost's
    READY=1 only says QEMU runs)."""
    wait_for(f"the guest on {node}", lambda: "TINYGUEST READY" in run_log(pcmk, node))


def check_graceful_move(pcmk: Cluster, old: str, new: str, boots: int, old_run: str) -> None:
    """The old run ended by the guest's own power-off (ACPI), the new run mounted a clean disk."""
    old_log = run_log(pcmk, old, old_run)
    assert "stop: ACPI power-down" in old_log
    assert "stop: QMP quit" not in old_log  # the guest was gone before the next step
    guest_ready(pcmk, new)
    assert "EXT4-fs (vda): mounted" in run_log(pcmk, new)
    assert RECOVERY not in run_log(pcmk, new)
    assert markers(pcmk) == ["vm-token"] * (boots + 1)


@pytest.mark.slow
def test_move_and_standby_stop_gracefully_and_start_elsewhere(pcmk: Cluster) -> None:
    """--move, then standby: the guest powers off on the old node, disk clean, boots on the new."""
    old, _ = pcmk.wait_running("vm", "vm", set(pcmk.nodes))
    guest_ready(pcmk, old)
    target = next(n for n in pcmk.nodes if n != old)
    boots, old_run = len(markers(pcmk)), invocation(pcmk.nodes[old], "vm")
    started = time.monotonic()
    pcmk.crm("crm_resource", "--move", "--resource", "vm", "--node", target)
    _, took = pcmk.wait_running("vm", "vm", {target})
    print(f"\ncrm_resource --move {old} -> {target}: running there after {took:.1f} s")
    assert time.monotonic() - started < 60
    check_graceful_move(pcmk, old, target, boots, old_run)
    pcmk.crm("crm_resource", "--clear", "--resource", "vm")

    boots, old_run = len(markers(pcmk)), invocation(pcmk.nodes[target], "vm")
    pcmk.crm("crm_standby", "--node", target, "--update", "on")
    try:
        rest = set(pcmk.nodes) - {target}
        new_node, took = pcmk.wait_running("vm", "vm", rest)
        print(f"standby of {target}: running on {new_node} after {took:.1f} s")
        check_graceful_move(pcmk, target, new_node, boots, old_run)
    finally:
        pcmk.crm("crm_standby", "--node", target, "--update", "off")


@pytest.mark.slow
def test_a_stopped_resource_leaves_a_clean_disk(pcmk: Cluster) -> None:
    """target-role=Stopped: the VM is down on every node, its ext4 clean, its markers there."""
    node, _ = pcmk.wait_running("vm", "vm", set(pcmk.nodes))
    guest_ready(pcmk, node)
    boots = len(markers(pcmk))
    meta = ("crm_resource", "--resource", "vm", "--meta")
    pcmk.crm(*meta, "--set-parameter", "target-role", "--parameter-value", "Stopped")
    try:
        wait_for("the VM stopped", lambda: pcmk.located("vm") == [])
        assert {pcmk.vm_state(n, "vm") for n in pcmk.nodes} == {"inactive"}
        dumpe2fs = ["dumpe2fs", "-h", str(pcmk.shared / "vm.img")]
        header = subprocess.run(dumpe2fs, capture_output=True, text=True, check=True).stdout
        assert "needs_recovery" not in header
        assert markers(pcmk) == ["vm-token"] * boots
    finally:
        pcmk.crm(*meta, "--delete-parameter", "target-role")
    pcmk.wait_running("vm", "vm", set(pcmk.nodes))


@pytest.mark.slow
def test_a_second_start_elsewhere_is_refused_by_the_image_lock(pcmk: Cluster) -> None:
    """The agent's start on a second node fails on the image lock; the running VM is untouched."""
    node, _ = pcmk.wait_running("vm", "vm", set(pcmk.nodes))
    pid = pcmk.ctl(node, "--json", "status", "vm").stdout
    other = next(n for n in pcmk.nodes if n != node)
    since = int(time.time())
    started = pcmk.agent(other, "start", "vm")
    try:
        assert started.returncode == OCF_ERR_GENERIC, started.stderr
        log = journal(pcmk.nodes[other], "--unit=vmhost@vm.service", f"--since=@{since}")
        assert 'Failed to get "write" lock' in log
    finally:
        assert pcmk.agent(other, "stop", "vm").returncode == 0
    assert pcmk.vm_state(other, "vm") == "inactive"
    assert pcmk.located("vm") == [node]
    assert pcmk.ctl(node, "--json", "status", "vm").stdout == pid


@pytest.mark.slow
def test_a_hung_qemu_fails_the_monitor_and_is_recovered(pcmk: Cluster) -> None:
    """SIGSTOP of QEMU fails the monitor (unresponsive); Pacemaker kills it and starts the VM."""
    node, _ = pcmk.wait_running("vm", "vm", set(pcmk.nodes))
    ct = pcmk.nodes[node]
    status = pcmk.ctl(node, "--json", "status", "vm").stdout
    pid = status.partition('"pid":')[2].partition(",")[0]
    ct.run("kill", "-STOP", pid)
    started = time.monotonic()
    try:
        wait_for("the monitor to fail", lambda: pcmk.failures("vm") != [], 60)
        [failure] = pcmk.failures("vm")
        assert (failure["op_key"], failure["node"]) == ("vm_monitor_5000", node)
        assert failure["exitreason"] == "vm is unresponsive"
        where, _ = pcmk.wait_running("vm", "vm", set(pcmk.nodes))
        took = time.monotonic() - started
        print(f"\nhung QEMU on {node}: running again on {where} after {took:.1f} s")
        assert ct.run("kill", "-0", pid, check=False).returncode != 0  # the hung one is gone
    finally:
        ct.run("kill", "-CONT", pid, check=False)
        pcmk.crm("crm_resource", "--cleanup", "--resource", "vm")


@pytest.mark.slow
def test_a_broken_config_is_refused_once_not_on_every_node(pcmk: Cluster) -> None:
    """validate-all says OCF_ERR_CONFIGURED; Pacemaker tries one start, then leaves it stopped."""
    (pcmk.configs / "broken.toml").write_text(config("vm", "x") + "[machine]\nmemory_mib = 1\n")
    node = next(iter(pcmk.nodes))
    validated = pcmk.agent(node, "validate-all", "broken")
    assert validated.returncode == OCF_ERR_CONFIGURED
    assert "broken.toml: invalid TOML" in validated.stderr
    (pcmk.configs / "broken.toml").write_text(
        config("vm", "x").replace("[stop]", "[stop]\nbogus = 1")
    )
    validated = pcmk.agent(node, "validate-all", "broken")
    assert validated.returncode == OCF_ERR_CONFIGURED
    assert "broken.toml: stop.bogus: unknown key" in validated.stderr
    pcmk.crm("cibadmin", "-C", "-o", "resources", "-X", cluster.primitive("broken", "broken"))
    try:
        wait_for("the start to fail", lambda: pcmk.failures("broken") != [])
        time.sleep(10)  # a start loop would show more failed starts by now
        [failure] = pcmk.failures("broken")
        assert failure["op_key"] == "broken_start_0"
        assert failure["exitstatus"] == "not configured"
        assert "stop.bogus: unknown key" in failure["exitreason"]
        assert pcmk.located("broken") == []
        for ct in pcmk.nodes.values():  # validate-all stopped it before any unit started
            assert invocation(ct, "broken") == ""
    finally:
        pcmk.crm("cibadmin", "-D", "-o", "resources", "-X", '<primitive id="broken"/>')
        pcmk.crm("crm_resource", "--cleanup")  # the deleted resource's history too
    assert pcmk.located("vm") != []


@pytest.mark.slow
def test_missing_pieces_and_probes(pcmk: Cluster) -> None:
    """No vmhost, QEMU or disk here: OCF_ERR_INSTALLED; a probe never starts a socket's VM."""
    node = next(iter(pcmk.nodes))
    bare = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    no_vmhost = pcmk.agent(node, "validate-all", "solo", **bare)
    assert no_vmhost.returncode == OCF_ERR_INSTALLED
    assert "not installed on this node: no vmhost vmhostctl" in no_vmhost.stderr
    probe = {"OCF_RESKEY_CRM_meta_interval": "0"}
    assert pcmk.agent(node, "monitor", "solo", **bare, **probe).returncode == OCF_NOT_RUNNING
    qemu = '[qemu]\nbinary = "/nonexistent/qemu-system-x86_64"\n'
    for name, toml, field in (
        ("noqemu", config("solo", "x") + qemu, "qemu.binary"),
        ("nodisk", config("nodisk", "x"), "disks[0].path"),
    ):
        (pcmk.configs / f"{name}.toml").write_text(toml)
        missing = pcmk.agent(node, "validate-all", name)
        assert missing.returncode == OCF_ERR_INSTALLED
        assert f"{name}.toml: {field}: " in missing.stderr
    ct = pcmk.nodes[node]
    ct.systemctl("start", "vmhost@solo.socket")
    try:
        assert pcmk.agent(node, "monitor", "solo", **probe).returncode == OCF_NOT_RUNNING
        assert pcmk.vm_state(node, "solo") == "inactive"  # not woken by the probe
    finally:
        ct.systemctl("stop", "vmhost@solo.socket")


def guest_uptime(pcmk: Cluster, node: str, vm: str) -> float:
    """The guest's own uptime, asked of its agent on ``node`` (the VM's state directory)."""
    ask = (
        "import asyncio, sys\n"
        "from vmhost.vm.agent import Agent\n"
        "async def main():\n"
        "    loop = asyncio.get_running_loop()\n"
        "    agent = await Agent.connect(sys.argv[1], deadline=loop.time() + 30)\n"
        "    print((await agent.get_health()).uptime_seconds)\n"
        "asyncio.run(main())\n"
    )
    socket = f"/var/lib/vmhost/{vm}/agent.sock"
    return float(pcmk.nodes[node].run(f"{pcmk.venv}/bin/python", "-c", ask, socket).stdout)


@pytest.mark.slow
def test_a_move_with_allow_migrate_is_live(pcmk: Cluster) -> None:
    """allow-migrate=true: --move migrates the guest live; one boot, its uptime counts on."""
    primitive = cluster.primitive("mig", "mig", migrate=True)
    pcmk.crm("cibadmin", "-C", "-o", "resources", "-X", primitive)
    try:
        source, _ = pcmk.wait_running("mig", "mig", set(pcmk.nodes))
        wait_for("the guest", lambda: "TINYGUEST READY" in mig_log(pcmk, source))
        before = guest_uptime(pcmk, source, "mig")
        target = next(n for n in pcmk.nodes if n != source)
        source_run = invocation(pcmk.nodes[source], "mig")
        started = time.monotonic()
        pcmk.crm("crm_resource", "--move", "--resource", "mig", "--node", target)
        _, took = pcmk.wait_running("mig", "mig", {target})
        print(f"\ncrm_resource --move (allow-migrate) {source} -> {target}: {took:.1f} s")
        assert time.monotonic() - started < 60
        after = guest_uptime(pcmk, target, "mig")
        assert after >= before
        old = mig_log(pcmk, source, source_run)
        assert "migrated: migrated to another host (downtime" in old
        assert "stop: ACPI power-down" not in old
        assert pcmk.vm_state(source, "mig") == "inactive"
        said = pcmk.ctl(source, "status", "mig", check=False)
        assert (said.returncode, said.stdout) == (3, "mig: migrated\n")  # not "stopped"
        assert pcmk.nodes[source].show("vmhost@mig.socket", "ActiveState")["ActiveState"] == (
            "inactive"  # down with the service: no connect boots it here again
        )
        assert "TINYGUEST READY" not in mig_log(pcmk, target)  # it did not boot there
        assert markers(pcmk, "mig") == ["mig-token"]  # one boot on the shared disk
        assert pcmk.failures("mig") == []
        ops = journal(pcmk.nodes[source], "SYSLOG_IDENTIFIER=pacemaker-controld")
        assert "mig_migrate_to_0" in ops or "migrate_to" in ops
    finally:
        pcmk.crm("crm_resource", "--clear", "--resource", "mig", check=False)
        pcmk.crm("crm_resource", "--resource", "mig", "--meta", "--set-parameter",
                 "target-role", "--parameter-value", "Stopped", check=False)  # fmt: skip
        pcmk.crm("crm_resource", "--wait", "--timeout=60s", check=False)
        pcmk.crm("cibadmin", "-D", "-o", "resources", "-X", '<primitive id="mig"/>', check=False)
    assert markers(pcmk, "mig") == ["mig-token"]


def mig_log(pcmk: Cluster, node: str, run: str = "", vm: str = "mig") -> str:
    return journal(
        pcmk.nodes[node], f"_SYSTEMD_INVOCATION_ID={run or invocation(pcmk.nodes[node], vm)}"
    )


@pytest.mark.slow
def test_a_failed_live_move_leaves_the_guest_running_at_the_source(pcmk: Cluster) -> None:
    """A live move that cannot finish in time: the guest runs on at the source, the failure
    says why, and once cleaned up Pacemaker finds the resource there and only there."""
    primitive = cluster.primitive("slow", "slow", migrate=True)  # migrate_to on-fail=block
    pcmk.crm("cibadmin", "-C", "-o", "resources", "-X", primitive)
    try:
        source, _ = pcmk.wait_running("slow", "slow", set(pcmk.nodes))
        run = invocation(pcmk.nodes[source], "slow")
        wait_for("the guest", lambda: "TINYGUEST READY" in mig_log(pcmk, source, vm="slow"))
        before = guest_uptime(pcmk, source, "slow")
        target = next(n for n in pcmk.nodes if n != source)
        pcmk.crm("crm_resource", "--move", "--resource", "slow", "--node", target)
        wait_for("the failed migrate_to", lambda: pcmk.failures("slow") != [], timeout=90)
        [failure] = pcmk.failures("slow")
        assert (failure["task"], failure["node"]) == ("migrate_to", source)
        agent = journal(pcmk.nodes[source], "SYSLOG_IDENTIFIER=vm(slow)")
        assert f"migration to {target} failed" in agent
        assert "not done in 3 s: cancelled" in mig_log(pcmk, source, run, "slow")
        assert pcmk.vm_state(source, "slow") == "running"
        assert invocation(pcmk.nodes[source], "slow") == run  # the same vmhost, never stopped
        assert pcmk.vm_state(target, "slow") in ("inactive", "failed")  # exit 10, gone
        assert guest_uptime(pcmk, source, "slow") > before
        pcmk.crm("crm_resource", "--clear", "--resource", "slow")
        pcmk.crm("crm_resource", "--cleanup", "--resource", "slow")  # probes everywhere
        pcmk.wait_running("slow", "slow", {source})
        assert pcmk.located("slow") == [source]
        assert invocation(pcmk.nodes[source], "slow") == run
        assert markers(pcmk, "slow") == ["slow-token"]  # one boot: it never moved
    finally:
        pcmk.crm("crm_resource", "--clear", "--resource", "slow", check=False)
        pcmk.crm("crm_resource", "--resource", "slow", "--meta", "--set-parameter",
                 "target-role", "--parameter-value", "Stopped", check=False)  # fmt: skip
        pcmk.crm("crm_resource", "--wait", "--timeout=60s", check=False)
        pcmk.crm("cibadmin", "-D", "-o", "resources", "-X", '<primitive id="slow"/>', check=False)


@pytest.mark.slow
def test_a_killed_node_fails_over_with_the_journal_replayed(pcmk: Cluster) -> None:
    """A killed node's VM runs on a survivor within 30 s; ext4 replays, the old marker is there."""
    node, _ = pcmk.wait_running("vm", "vm", set(pcmk.nodes))
    guest_ready(pcmk, node)
    boots = len(markers(pcmk))
    dc = pcmk.crm("crm_mon", "-1").stdout.partition("Current DC: ")[2].split(" ")[0]
    pcmk.kill(node)
    started = time.monotonic()
    survivor, _ = pcmk.wait_running("vm", "vm", set(pcmk.nodes) - {node}, timeout=60)
    took = time.monotonic() - started
    print(f"\nnode {node} (DC: {dc}) killed: vm running on {survivor} after {took:.1f} s")
    assert took < 30
    guest_ready(pcmk, survivor)
    assert RECOVERY in run_log(pcmk, survivor)
    assert markers(pcmk) == ["vm-token"] * (boots + 1)
