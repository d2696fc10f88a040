"""The results: one msgspec Struct, written as JSON and as a markdown page."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import msgspec

from . import proc
from .lifecycle import Footprint, GracefulStop, StartPath
from .load import Run
from .watchers import Watchers, report


class Machine(msgspec.Struct):
    cpu: str
    cpus: int
    memory_mib: int
    kernel: str
    python: str
    qemu: str
    busy_before: float
    """Share of the CPUs other processes used in the second before the bench started."""


class LoadResults(msgspec.Struct):
    label: str
    idle_rss_kib: int
    peak_rss_kib: int
    runs: list[Run]


class Target(msgspec.Struct):
    name: str
    goal: str
    measured: str
    met: bool


class Profile(msgspec.Struct):
    """Where the server's time goes (cProfile, stand-in, status one request per connection)."""

    load: str
    top: list[str]


class Results(msgspec.Struct):
    command: str
    started: str
    seconds_per_run: float
    repeat: int
    machine: Machine
    reference: LoadResults | None
    service: LoadResults | None
    stand_ins: list[LoadResults]
    start_path: StartPath | None
    graceful_stop: GracefulStop | None
    footprint: Footprint | None
    profile: Profile | None
    targets: list[Target]
    watchers: list[Watchers] = msgspec.field(default_factory=list)


def _find(results: LoadResults | None, method: str, mode: str, clients: int) -> Run | None:
    if results is None:
        return None
    for run in results.runs:
        if (run.method, run.mode, run.clients) == (method, mode, clients):
            return run
    return None


def targets(r: Results) -> list[Target]:
    """The issue's targets, each judged on the real service's figures."""
    out = []
    one = _find(r.service, "status", "conn", 1)
    sixteen = _find(r.service, "status", "conn", 16)
    if one is not None:
        out.append(
            Target("status, 1 client", ">= 15,000 req/s", f"{one.rps:,.0f}", one.rps >= 15_000)
        )
    if sixteen is not None:
        out.append(
            Target(
                "status, 16 clients",
                ">= 60,000 req/s",
                f"{sixteen.rps:,.0f}",
                sixteen.rps >= 60_000,
            )
        )
        out.append(
            Target(
                "p99 at 16 clients",
                "< 1 ms",
                f"{sixteen.p99_us / 1000:.2f} ms",
                sixteen.p99_us < 1000,
            )
        )
    if r.service is not None:
        bad = sum(run.failed + run.wrong for run in r.service.runs)
        total = sum(run.requests for run in r.service.runs)
        out.append(Target("wrong or failed answers", "0", f"{bad} of {total:,}", bad == 0))
        peak = max(r.service.peak_rss_kib, r.service.idle_rss_kib)
        out.append(Target("vmhost RSS", "<= 30 MB", f"{peak / 1024:.1f} MiB", peak <= 30 * 1024))
    if r.start_path is not None and r.start_path.runs:
        ready = proc.median([s.exec_to_ready for s in r.start_path.runs])
        gone = proc.median([s.force_stop_to_gone for s in r.start_path.runs])
        out.append(Target("exec -> READY=1", "<= 150 ms", f"{ready * 1000:.0f} ms", ready <= 0.150))
        out.append(
            Target("force_stop -> gone", "<= 100 ms", f"{gone * 1000:.0f} ms", gone <= 0.100)
        )
    if r.watchers:
        idle = r.watchers[0]
        ratio = idle.p99_with_us / idle.p99_without_us
        out.append(
            Target(
                f"status p99, 100 watchers + 1 deaf, {idle.changes_per_second:g} change/s",
                "<= 1.10x without",
                f"{ratio:.2f}x",
                ratio <= 1.10,
            )
        )
    return out


def _ms(seconds: Iterable[float]) -> str:
    values = sorted(seconds)
    low, high = values[0] * 1000, values[-1] * 1000
    return f"{proc.median(values) * 1000:.0f} ms (min {low:.0f}, max {high:.0f}, n={len(values)})"


def _load_table(results: LoadResults) -> list[str]:
    lines = [
        f"### {results.label}",
        "",
        f"RSS idle {results.idle_rss_kib / 1024:.1f} MiB, peak under load "
        f"{results.peak_rss_kib / 1024:.1f} MiB.",
        "",
        "| method | connection | clients | req/s | p50 | p99 | max | server CPU/req | "
        "server CPU | loadgen CPU | failed/wrong |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for run in results.runs:
        mode = "one per request" if run.mode == "conn" else "persistent"
        lines.append(
            f"| {run.method} | {mode} | {run.clients} | {run.rps:,.0f} | {run.p50_us:,.0f} µs | "
            f"{run.p99_us:,.0f} µs | {run.max_us / 1000:,.1f} ms | "
            f"{run.server_cpu_us_per_request:.1f} µs | {run.server_cpu_share:.0%} | "
            f"{run.loadgen_cpu_share:.0%} | {run.failed}/{run.wrong} |"
        )
    return [*lines, ""]


def markdown(r: Results) -> str:
    m = r.machine
    lines = [
        "# vmhost benchmark results",
        "",
        f"Reproduce: `{r.command}` (from the repository root). Run at {r.started}, "
        f"{r.seconds_per_run:g} s per load run, the fastest of {r.repeat} kept "
        "(failed/wrong counted over all).",
        "",
        f"Machine: {m.cpu}, {m.cpus} CPUs, {m.memory_mib:,} MiB, Linux {m.kernel}, "
        f"Python {m.python}, {m.qemu}. Other processes used {m.busy_before:.0%} of the CPUs "
        "just before the run (figures are only comparable from a quiet machine).",
        "",
        "The server under load is pinned to CPU 0, the C load generator (`bench/loadgen.c`) to "
        'CPU 1. "server CPU" is the server\'s utime+stime per wall second (100% = it is the '
        'bottleneck); "loadgen CPU" is the generator\'s own, on its own CPU (below 100% = it '
        "is not the bottleneck).",
        "",
        "Measured apart, each by its own command: many idle VMs (PSS beside its anchors, idle "
        "CPU, exec → READY=1, start-all/list/stop-all of 20 VMs) in "
        "[density.md](density.md) (`python3 -m bench.density`), live migration in "
        "[migration.md](migration.md) (`python3 -m bench.migration`).",
        "",
        "## Targets",
        "",
        "| target | goal | measured | met |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {t.name} | {t.goal} | {t.measured} | {'yes' if t.met else 'NO'} |" for t in r.targets
    ]
    lines += ["", "## Requests", ""]
    for results in (r.service, *r.stand_ins, r.reference):
        if results is not None:
            lines += _load_table(results)
    if r.start_path is not None:
        s = r.start_path
        lines += [
            "## Start and stop",
            "",
            f"- exec → READY=1 (QEMU runs, guest boot excluded): "
            f"{_ms(x.exec_to_ready for x in s.runs)}",
            f"  - of which the interpreter starting: {s.interpreter * 1000:.0f} ms; "
            f"importing vmhost's service modules: {s.imports * 1000:.0f} ms "
            f"(by package, own time: {', '.join(s.slowest_imports)})",
            f"- force_stop → vmhost process gone: {_ms(x.force_stop_to_gone for x in s.runs)}; "
            f"QEMU already gone then in {sum(x.qemu_gone_with_vmhost for x in s.runs)} of "
            f"{len(s.runs)} runs",
            f"  - of which the interpreter's own exit (module teardown, skipped by `os._exit`): "
            f"{s.finalization * 1000:.0f} ms",
        ]
    if r.graceful_stop is not None:
        g = r.graceful_stop
        lines += [
            "- graceful ACPI stop of the tiny guest, `stop` → vmhost gone: "
            f"{_ms(g.through_vmhost)}; "
            f"the same guest and QEMU command line stopped by QMP alone: {_ms(g.guest_alone)}; "
            f"**vmhost adds {g.overhead * 1000:.0f} ms**",
        ]
    if r.footprint is not None:
        f = r.footprint
        lines += [
            "",
            "## Footprint of idle VMs (vmhost processes only; QEMU apart)",
            "",
            "| VMs | RSS sum | PSS sum | USS sum | QEMU RSS sum |",
            "|--:|--:|--:|--:|--:|",
        ]
        lines += [
            f"| {s.vms} | {s.rss_kib / 1024:.1f} MiB | {s.pss_kib / 1024:.1f} MiB | "
            f"{s.uss_kib / 1024:.1f} MiB | {s.qemu_rss_kib / 1024:.0f} MiB |"
            for s in f.steps
        ]
        lines += [
            "",
            f"PSS grows by {f.pss_slope_kib / 1024:.1f} MiB per VM (least squares); 100 VMs: "
            f"about {f.pss_for_100_kib / 1024:.0f} MiB of vmhost processes. An idle vmhost uses "
            f"{f.idle_cpu_ms_per_s:.2f} ms of CPU per second.",
        ]
    if r.watchers:
        lines += ["", *report(r.watchers)]
    if r.profile is not None:
        lines += ["", "## Profile", "", r.profile.load, "", "```", *r.profile.top, "```"]
    return "\n".join(lines) + "\n"


def write(r: Results, outdir: Path) -> None:
    (outdir / "results.json").write_bytes(msgspec.json.format(msgspec.json.encode(r)) + b"\n")
    (outdir / "results.md").write_text(markdown(r))
