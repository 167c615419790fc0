"""Launch overhead: hydra/callbacks=torchrun against bare torchrun, same task body.

    python benchmarks/launch_overhead.py --reps 5 --extras --slurm --out benchmarks/RESULTS.md
    python benchmarks/launch_overhead.py --quick        # 1 repetition, N=2, few steps (CI smoke)

The first command (as root, for the SLURM sandbox; otherwise that section says it was
skipped) regenerates all of RESULTS.md, keeping its hand-written "Reading the figures"
section, and writes launch_overhead.png beside it. Systems run alternately
(A B A B ...) so the machine's drift cancels. Per run: wall until every process is gone
(stderr pipe closed) and until the top process exited, start -> first collective (latest
rank), CPU of the whole tree, peak RSS of the top (Hydra / torchrun agent) process, and
the processes left alive (must be 0). "Where the time goes" splits each run at milestones
the processes timestamp (body.py, phases.py, _rss.py), so the next optimisation can be
picked from data. Also: DDP steady-state step time (steady_state.py), the seconds per
extra emulated node (least squares), and with --slurm a 2-node job against sbatch + srun
torchrun (slurm_compare.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import steady_state
from _report import med, phase_table, span, values
from _runner import HERE, Run, enable_subreaper, free_port, run
from _venv import VENVS, describe, has

FULL = "python benchmarks/launch_overhead.py --reps 5 --extras --slurm --out benchmarks/RESULTS.md"
#: The app's two shapes: torch imported inside the task (the Hydra process never imports
#: it), and at module top (most training scripts: the Hydra process imports it first).
APPS = {"lazy": "bench_app.py", "top": "bench_app_top.py", "lightning": "bench_app_lightning.py"}
NOTES = {"lazy": "", "top": ", torch at top", "lightning": ", Lightning at top"}


@dataclass
class System:
    name: str
    group: str  # rows compared with each other share a group (and a table)
    cmds: Callable[[], list[list[str]]]  # called per run (fresh ports)
    jobs: int = 1  # Hydra jobs per run (a multirun): walls and CPU are shown per job
    kind: str = ""  # the line in the plot (same kind across groups)
    x: int = 0  # N or k, for the plot and the slope
    phases: bool = True  # a column of "Where the time goes"
    python: str = sys.executable  # the venv's interpreter that runs it
    runs: list[Run] = field(default_factory=list)

    def med(self, attr: str) -> float:
        return med(self.runs, attr)

    def values(self, attr: str) -> list[float]:
        return values(self.runs, attr)


def torchrun(n: int) -> list[list[str]]:
    return [
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={n}",
            str(HERE / "body.py"),
        ]
    ]


def torchrun_nodes(k: int) -> list[list[str]]:
    port = free_port()
    return [
        [
            "-m",
            "torch.distributed.run",
            f"--nnodes={k}",
            "--nproc-per-node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=localhost:{port}",
            f"--rdzv-id=bench{port}",
            str(HERE / "body.py"),
        ]
        for _ in range(k)
    ]


#: The phases callback first (its start hooks run before the torchrun callback's).
CALLBACKS = "hydra/callbacks=[phases,torchrun]"
SPAWN = "hydra.callbacks.torchrun.start_method=spawn"
FRESH = "hydra.callbacks.torchrun.warm_server=fresh"


def ours(n: int, *extra: str, multirun: int = 0, shape: str = "lazy") -> list[list[str]]:
    cmd = [
        str(HERE / APPS[shape]),
        CALLBACKS,
        f"hydra.callbacks.torchrun.nproc_per_node={n}",
        "hydra.run.dir=out",
        "hydra.sweep.dir=multi",
        *extra,
    ]
    if multirun:
        cmd.insert(1, "-m")
        cmd.append("+point=" + ",".join(str(i) for i in range(multirun)))
    return [cmd]


def ours_nodes(k: int, *extra: str) -> list[list[str]]:
    return [
        [
            str(HERE / "bench_app.py"),
            "-m",
            "hydra/launcher=submitit_local",
            f"hydra.launcher.tasks_per_node={k}",
            CALLBACKS,
            "hydra.callbacks.torchrun.nproc_per_node=1",
            "hydra.sweep.dir=multi",
            *extra,
        ]
    ]


def table(systems: list[System], baseline: dict[str, str]) -> str:
    rows = [
        "| system | wall s (median, min-max) | top process exit s | start -> 1st collective s | "
        "CPU s | peak RSS agent MB | left alive | wall ratio vs torchrun |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_name = {s.name: s for s in systems}
    for s in systems:
        base = by_name.get(baseline.get(s.group, ""))
        ratio = s.med("wall") / base.med("wall") if base else 1.0
        first = s.med("first")
        rows.append(
            f"| {s.name} | {s.med('wall'):.2f} ({span(s.runs, 'wall')}) | "
            f"{s.med('top_exit'):.2f} | "
            f"{'n/a' if first != first else f'{first:.2f}'} | {s.med('cpu'):.2f} | "
            f"{s.med('rss_mb'):.0f} | {max(s.values('leftovers')):.0f} | {ratio:.2f}x |"
        )
    return "\n".join(rows)


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (seconds per extra node)."""
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else float("nan")


def slope_lines(systems: list[System]) -> list[str]:
    """Per node kind: the least-squares slope of wall vs k over every run."""
    kinds = dict.fromkeys(s.kind for s in systems)
    out = []
    for kind in kinds:
        pts = [(float(s.x), r.wall) for s in systems if s.kind == kind for r in s.runs]
        if len({x for x, _ in pts}) > 1:
            out.append(
                f"- {kind}: **{slope(pts):.2f} s per extra node** "
                f"(wall, least squares over {len(pts)} runs)"
            )
    return out


def plot(systems: list[System], path: Path) -> str:
    """Wall vs workers and wall vs nodes (median, min-max bars); a note if impossible."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (
            "Plot: matplotlib is not installed (pip install 'hydra-torchrun-callback[bench]'); "
            "no PNG written."
        )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, prefix, xlabel in (
        (axes[0], "N=", "workers N (one node)"),
        (axes[1], "nodes=", "emulated nodes k (1 worker each)"),
    ):
        chosen = [  # the full venv's (the minimal venv's are in the tables)
            s for s in systems if s.group.startswith(prefix) and s.kind and "venv)" not in s.group
        ]
        for kind in dict.fromkeys(s.kind for s in chosen):
            line = sorted((s for s in chosen if s.kind == kind), key=lambda s: s.x)
            mid = [s.med("wall") for s in line]
            low = [m - min(s.values("wall")) for m, s in zip(mid, line, strict=True)]
            high = [max(s.values("wall")) - m for m, s in zip(mid, line, strict=True)]
            ax.errorbar(
                [s.x for s in line], mid, yerr=[low, high], marker="o", capsize=4, label=kind
            )
        if not chosen:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("wall s (every process gone)")
        ax.set_xticks(sorted({s.x for s in chosen}) or [1])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if chosen:
            ax.legend(fontsize=8)
    fig.suptitle("hydra/callbacks=torchrun vs bare torchrun (median, min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"Plot: {path.name} (wall vs workers, wall vs nodes)."


def kept_reading(out: Path | None) -> str:
    """The hand-written section of an existing report, kept when it is regenerated."""
    if out is None or not out.exists():
        return ""
    m = re.search(r"^## Reading the figures\n.*", out.read_text(), flags=re.S | re.M)
    return m.group(0).rstrip() + "\n" if m else ""


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--nprocs", default="1,2,4")
    ap.add_argument("--nodes", default="1,2,4")
    ap.add_argument("--quick", action="store_true", help="1 repetition, N=2 only, 20 steps (smoke)")
    ap.add_argument("--extras", action="store_true", help="also: 100 MB return, 10k-key config")
    ap.add_argument("--steps", type=int, default=300, help="steady state: timed steps (0: skip)")
    ap.add_argument("--warmup", type=int, default=20, help="steady state: untimed steps first")
    ap.add_argument("--slurm", action="store_true", help="also 2 nodes on a SLURM sandbox (root)")
    ap.add_argument("--slurm-reps", type=int, default=2)
    ap.add_argument(
        "--shapes",
        default="lazy,top",
        help="app shapes: lazy (torch imported in the task), top (at module top), lightning "
        "(Lightning at module top, the task uses it; venvs without Lightning skip it)",
    )
    ap.add_argument(
        "--venvs",
        default="full,minimal",
        help="full: this interpreter's venv; minimal: benchmarks/.venv-minimal (torch and "
        "the package's own dependencies only, built on first use)",
    )
    ap.add_argument("--out", type=Path, help="write the Markdown report here")
    ap.add_argument("--plot", type=Path, help="PNG (default: launch_overhead.png beside --out)")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.nprocs, args.nodes, args.venvs = 1, "2", "", "full"
        args.steps, args.warmup, args.slurm = min(args.steps, 20), min(args.warmup, 5), False
    args.nprocs = [int(x) for x in args.nprocs.split(",") if x]
    args.nodes = [int(x) for x in args.nodes.split(",") if x]
    args.shapes = [x for x in args.shapes.split(",") if x]
    args.venvs = [x for x in args.venvs.split(",") if x]
    for value, known, option in ((args.shapes, APPS, "--shapes"), (args.venvs, VENVS, "--venvs")):
        unknown = sorted(set(value) - set(known))
        if unknown or not value:
            ap.error(
                f"{option}: {','.join(unknown) or 'nothing'}; expected some of {','.join(known)}"
            )
    if args.plot is None and args.out is not None:
        args.plot = args.out.parent / "launch_overhead.png"
    return args


def make_plan(args: argparse.Namespace) -> tuple[list[System], dict[str, str]]:
    """Every system to run once per round, and each group's baseline row."""
    jobs = 2 if args.quick else 4  # per multirun
    plan: list[System] = []
    baseline: dict[str, str] = {}
    pythons = {venv: VENVS[venv]() for venv in args.venvs}
    for venv, python in pythons.items():
        suffix = "" if venv == "full" else f" ({venv} venv)"
        shapes = [s for s in args.shapes if s != "lightning" or has(python, "lightning")]
        for n in args.nprocs:
            g = f"N={n}{suffix}"
            baseline[g] = f"torchrun --standalone N={n}{suffix}"
            row = partial(System, group=g, python=python, x=n)
            plan.append(row(baseline[g], cmds=partial(torchrun, n), kind="torchrun --standalone"))
            for shape in shapes:
                name = NOTES[shape]
                plan.append(
                    row(
                        f"ours default N={n}{name}{suffix}",
                        cmds=partial(ours, n, shape=shape),
                        kind=f"ours default{name}",
                    )
                )
            if "lightning" in shapes:  # what the fork saves: a fresh server's workers import it
                plan.append(
                    row(
                        f"ours warm_server=fresh N={n}{NOTES['lightning']}{suffix}",
                        cmds=partial(ours, n, FRESH, shape="lightning"),
                        kind="ours warm_server=fresh, Lightning at top",
                    )
                )
            if "lazy" in shapes:
                plan.append(
                    row(
                        f"ours spawn N={n}{suffix}", cmds=partial(ours, n, SPAWN), kind="ours spawn"
                    )
                )
            for shape in shapes:
                name = NOTES[shape]
                plan.append(
                    row(
                        f"ours multirun {jobs} jobs, per job, N={n}{name}{suffix}",
                        cmds=partial(ours, n, multirun=jobs, shape=shape),
                        jobs=jobs,
                        phases=False,
                        x=0,
                    )
                )
    for k in args.nodes:
        g = f"nodes={k}"
        baseline[g] = f"torchrun x{k} agents by hand (c10d), 1 worker each"
        plan += [
            System(baseline[g], g, partial(torchrun_nodes, k), kind="torchrun agents (c10d)", x=k),
            System(
                f"ours submitit_local {k} nodes x 1 worker",
                g,
                partial(ours_nodes, k),
                kind="ours submitit_local (default)",
                x=k,
            ),
            System(
                f"ours submitit_local spawn {k} nodes x 1 worker",
                g,
                partial(ours_nodes, k, SPAWN),
                kind="ours submitit_local spawn",
                x=k,
            ),
        ]
    if args.extras:
        big = Path(tempfile.mkdtemp(prefix="bench_cfg_"))
        (big / "big.yaml").write_text(
            "return_mb: 0\n" + "".join(f"k{i}: {i}\n" for i in range(10_000))
        )
        g = "extras"
        baseline[g] = "ours default N=2 (reference)"
        plan += [
            System(baseline[g], g, partial(ours, 2)),
            System("ours N=2, rank 0 returns 100 MB", g, partial(ours, 2, "return_mb=100")),
            System(
                "ours N=2, 10k-key config",
                g,
                partial(ours, 2, f"--config-dir={big}", "--config-name=big"),
            ),
        ]
    if args.steps:
        steady = steady_state.systems(args.steps, args.warmup, spawn=not args.quick)
        plan += [System(st.name, "steady", partial(list, st.cmds), phases=False) for st in steady]
    return plan, baseline


def render(args: argparse.Namespace, plan: list[System], baseline: dict[str, str]) -> str:
    """The Markdown report (also runs the SLURM section and draws the plot)."""
    venvs = {venv: VENVS[venv]() for venv in args.venvs}
    by_group: dict[str, list[System]] = {}
    for s in plan:
        by_group.setdefault(s.group, []).append(s)
    command = " ".join(["python benchmarks/launch_overhead.py", *sys.argv[1:]])
    report = [
        "# Launch overhead: hydra/callbacks=torchrun vs bare torchrun",
        "",
        "Regenerate everything (tables, phases, steady state, slopes, plot; the SLURM section "
        f"needs root): `{FULL}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"torch {__import__('torch').__version__} (CPU), {platform.platform()}",
        f"This run: `{command}`",
        "",
        "Venvs (the same torch; what else a venv holds changes import times: torch imports "
        "numpy when it is there):",
        "",
        *[f"- {venv}: {describe(python)}" for venv, python in venvs.items()],
        "",
        "App shapes: rows without a note run bench_app.py, which imports torch inside the "
        'task (the Hydra process never imports it); rows marked "torch at top" run '
        "bench_app_top.py, the same app with `import torch` at module top, as most training "
        "scripts (the Hydra process imports torch before the callback runs); rows marked "
        '"Lightning at top" run bench_app_lightning.py (Lightning imported at the top, the '
        "task uses it). torchrun runs body.py either way.",
        f"Repetitions: {args.reps} per system, run alternately (A B A B ...). "
        "Same body everywhere: init_process_group(gloo), all_reduce(rank), check, destroy. "
        '"ours default" passes no start_method (the callback\'s default); "ours spawn" '
        "passes start_method=spawn. Wall = until every process of the run is gone (the "
        "stderr pipe closed, no process with the run's tag left); top process exit = when the "
        "Hydra process / torchrun agent exited; left alive = processes of the run still "
        "alive after it (must be 0).",
        "",
    ]
    nodes = [s for s in plan if s.group.startswith("nodes=")]
    for group, members in by_group.items():
        if group == "steady":
            continue
        report += [f"## {group}", "", table(members, baseline), ""]
        if nodes and group == nodes[-1].group and len(args.nodes) > 1:
            ks = ",".join(map(str, args.nodes))
            report += [f"Seconds per extra emulated node (slope of wall vs k, k = {ks}):", ""]
            report += [*slope_lines(nodes), ""]
    report += [
        "## Where the time goes",
        "",
        "Median seconds per phase; a phase runs from the previous milestone the system has to "
        "the one named. Rank milestones are the latest rank's; worker creation is /proc "
        "starttime (10 ms ticks; under a forkserver, the fork). Medians of phases need not add "
        "up to the median wall.",
        "",
    ]
    for group, members in by_group.items():
        cols = [(s.name, s.runs) for s in members if s.phases]
        if cols:
            report += [f"### {group}", "", phase_table(cols), ""]
    if "steady" in by_group:
        steady = [steady_state.SteadySystem(s.name, [], runs=s.runs) for s in by_group["steady"]]
        report += [
            "## Steady state (DDP step time)",
            "",
            steady_state.report(steady, args.steps, args.warmup),
            "",
        ]
    if args.slurm:
        import slurm_compare

        report += ["## SLURM: 2 nodes x 2 workers", "", slurm_compare.section(args.slurm_reps), ""]
    if args.plot is not None:
        report += [plot(plan, args.plot), ""]
    return "\n".join(report)


def main() -> int:
    args = parse_args()
    enable_subreaper()
    plan, baseline = make_plan(args)
    for rep in range(args.reps):  # A B A B ...: every system once per round
        for system in plan:
            system.runs.append(run(system.cmds(), jobs=system.jobs, python=system.python))
            last = system.runs[-1]
            print(
                f"round {rep + 1}/{args.reps} {system.name}: {last.wall / last.jobs:.2f}s"
                + (f" ({last.leftovers} LEFT ALIVE)" if last.leftovers else ""),
                file=sys.stderr,
            )
    text = render(args, plan, baseline)
    print(text)
    if args.out:
        kept = kept_reading(args.out)
        args.out.write_text(text + ("\n\n" + kept if kept else "\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
