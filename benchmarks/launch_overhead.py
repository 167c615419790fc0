"""Launch overhead: hydra/callbacks=torchrun against bare torchrun, same task body.

    python benchmarks/launch_overhead.py                 # the full table (RESULTS.md)
    python benchmarks/launch_overhead.py --quick         # 1 repetition, N=2 (CI smoke run)

Systems run alternately (A B A B ...) so the machine's drift cancels. Per run it records
the whole-process wall time, the time from start to the first collective completing
(latest rank), CPU seconds of the whole process tree, and the peak RSS of the top
(Hydra / torchrun agent) process. Prints Markdown tables; --out writes them to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@dataclass
class Sample:
    wall: float
    first: float  # start -> last rank's first collective done
    cpu: float
    rss_mb: float
    jobs: int = 1


@dataclass
class System:
    @staticmethod
    def _per_job(sample: Sample, attr: str) -> float:
        value = float(getattr(sample, attr))
        return value if attr == "rss_mb" else value / sample.jobs

    name: str
    group: str  # rows compared with each other share a group
    samples: list[Sample] = field(default_factory=list)

    def med(self, attr: str) -> float:
        return statistics.median(self._per_job(s, attr) for s in self.samples)

    def span(self, attr: str) -> str:
        vals = [self._per_job(s, attr) for s in self.samples]
        return f"{min(vals):.2f}-{max(vals):.2f}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def _env(out: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env["BENCH_OUT"] = str(out)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), env.get("PYTHONPATH", "")])
    return env


def run_once(cmds: list[list[str]], jobs: int = 1) -> Sample:
    """Run the commands at once (several = several agents by hand); wait for all."""
    work = Path(tempfile.mkdtemp(prefix="bench_"))
    out = work / "ranks"
    out.mkdir()
    rss_files = [work / f"rss{i}" for i in range(len(cmds))]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "_rss.py"), str(rss), *cmd],
            cwd=work,
            env=_env(out),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for cmd, rss in zip(cmds, rss_files, strict=True)
    ]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"{cmds} failed ({p.returncode}):\n{err.decode()[-3000:]}")
    firsts = [json.loads(p.read_text())["first_collective"] for p in out.rglob("rank*.json")]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rss = max(int(r.read_text()) for r in rss_files if r.exists()) / 1024
    shutil.rmtree(work, ignore_errors=True)
    return Sample(
        wall=wall,
        first=max(firsts) - start if firsts else float("nan"),
        cpu=cpu,
        rss_mb=rss,
        jobs=jobs,
    )


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
    port = _free_port()
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


def ours(n: int, *extra: str, multirun: int = 0) -> list[list[str]]:
    cmd = [
        str(HERE / "bench_app.py"),
        "hydra/callbacks=torchrun",
        f"hydra.callbacks.torchrun.nproc_per_node={n}",
        "hydra.run.dir=out",
        "hydra.sweep.dir=multi",
        *extra,
    ]
    if multirun:
        cmd.insert(1, "-m")
        cmd.append("+point=" + ",".join(str(i) for i in range(multirun)))
    return [cmd]


def ours_nodes(k: int) -> list[list[str]]:
    return [
        [
            str(HERE / "bench_app.py"),
            "-m",
            "hydra/launcher=submitit_local",
            f"hydra.launcher.tasks_per_node={k}",
            "hydra/callbacks=torchrun",
            "hydra.callbacks.torchrun.nproc_per_node=1",
            "hydra.sweep.dir=multi",
        ]
    ]


def table(systems: list[System], baseline: dict[str, str]) -> str:
    rows = [
        "| system | wall s (median, min-max) | start -> 1st collective s | CPU s | "
        "peak RSS agent MB | wall ratio vs torchrun |",
        "|---|---|---|---|---|---|",
    ]
    by_name = {s.name: s for s in systems}
    for s in systems:
        base = by_name.get(baseline.get(s.group, ""))
        ratio = f"{s.med('wall') / base.med('wall'):.2f}x" if base and base is not s else "1.00x"
        first = s.med("first")
        rows.append(
            f"| {s.name} | {s.med('wall'):.2f} ({s.span('wall')}) | "
            f"{'n/a' if first != first else f'{first:.2f}'} | {s.med('cpu'):.2f} | "
            f"{s.med('rss_mb'):.0f} | {ratio} |"
        )
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--nprocs", default="1,2,4")
    ap.add_argument("--nodes", default="1,2,4")
    ap.add_argument("--quick", action="store_true", help="1 repetition, N=2 only (CI smoke)")
    ap.add_argument("--extras", action="store_true", help="also: 100 MB return, 10k-key config")
    ap.add_argument("--out", type=Path, help="write the Markdown report here")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.nprocs, args.nodes = 1, "2", ""
    nprocs = [int(x) for x in args.nprocs.split(",") if x]
    nodes = [int(x) for x in args.nodes.split(",") if x]

    plan: list[tuple[System, object]] = []
    baseline: dict[str, str] = {}
    for n in nprocs:
        g = f"N={n}"
        baseline[g] = f"torchrun --standalone N={n}"
        plan += [
            (System(baseline[g], g), lambda n=n: run_once(torchrun(n))),
            (System(f"ours spawn N={n}", g), lambda n=n: run_once(ours(n))),
            (
                System(f"ours multirun 4 jobs, per job, N={n}", g),
                lambda n=n: run_once(ours(n, multirun=4), jobs=4),
            ),
            (
                System(f"ours forkserver N={n}", g),
                lambda n=n: run_once(ours(n, "hydra.callbacks.torchrun.start_method=forkserver")),
            ),
        ]
    for k in nodes:
        g = f"nodes={k}"
        baseline[g] = f"torchrun x{k} agents by hand (c10d), 1 worker each"
        plan += [
            (System(baseline[g], g), lambda k=k: run_once(torchrun_nodes(k))),
            (
                System(f"ours submitit_local {k} nodes x 1 worker", g),
                lambda k=k: run_once(ours_nodes(k)),
            ),
        ]
    if args.extras:
        big = Path(tempfile.mkdtemp(prefix="bench_cfg_"))
        (big / "big.yaml").write_text(
            "return_mb: 0\n" + "".join(f"k{i}: {i}\n" for i in range(10_000))
        )
        g = "extras"
        baseline[g] = "ours spawn N=2 (reference)"
        plan += [
            (System(baseline[g], g), lambda: run_once(ours(2))),
            (
                System("ours N=2, rank 0 returns 100 MB", g),
                lambda: run_once(ours(2, "return_mb=100")),
            ),
            (
                System("ours N=2, 10k-key config", g),
                lambda: run_once(ours(2, f"--config-dir={big}", "--config-name=big")),
            ),
        ]

    for rep in range(args.reps):  # A B A B ...: every system once per round
        for system, fn in plan:
            system.samples.append(fn())  # type: ignore[operator]
            print(
                f"round {rep + 1}/{args.reps} {system.name}: "
                f"{system.samples[-1].wall / system.samples[-1].jobs:.2f}s",
                file=sys.stderr,
            )

    systems = [s for s, _ in plan]
    report = [
        "# Launch overhead: hydra/callbacks=torchrun vs bare torchrun",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"torch {__import__('torch').__version__} (CPU), {platform.platform()}",
        f"Command: `python benchmarks/launch_overhead.py {' '.join(sys.argv[1:])}`",
        f"Repetitions: {args.reps} per system, run alternately (A B A B ...). "
        "Same body everywhere: init_process_group(gloo), all_reduce(rank), check, destroy.",
        "",
    ]
    for group in dict.fromkeys(s.group for s in systems):
        report += [f"## {group}", "", table([s for s in systems if s.group == group], baseline), ""]
    text = "\n".join(report)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
