"""SLURM: a 2-node x 2-worker job through our app vs what users write instead, on a real sandbox.

    sudo python benchmarks/slurm_compare.py --reps 2      # or launch_overhead.py --slurm

Ours: ``bench_app.py -m hydra/launcher=submitit_slurm hydra.launcher.nodes=2
hydra.launcher.tasks_per_node=1 hydra/callbacks=[phases,torchrun]
hydra.callbacks.torchrun.nproc_per_node=2``, command start -> return, also as
``bench_app_top.py`` (torch imported at module top, as most training scripts). Theirs: a batch
script running ``srun torchrun --nnodes=2 --nproc-per-node=2 --rdzv-backend=c10d
--rdzv-endpoint=$head:PORT --rdzv-id=$SLURM_JOB_ID body.py`` (torchrun as ``python _rss.py
FILE -m torch.distributed.run``, the console script's own code, so each agent's creation is
timestamped), submit -> job gone from squeue. That wait polls squeue every 0.2 s:
``sbatch --wait`` itself sleeps 2, 8, then 32 s between checks (a 13 s job returned after
42 s here), which would measure sbatch, not the job. Both run on the
hydra_torchrun_callback.slurm_sandbox cluster (slurmctld + 2 slurmd on this machine, root
only) with the same allocation (1 task x 2 CPUs per node). Each side's timestamps
(submission, start and end from scontrol at 1 s resolution; node-side processes, workers,
first collective, end from the processes) attribute the gap: submitit's pickling and
polling, the Hydra start in each node's job, the job stores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from _report import med, phase_table, span, values
from _runner import HERE, REPO, Run, enable_subreaper, free_port, run

#: Job processes keep exiting after the client returns (task 0's result is written first).
GRACE = 20.0
NAMES = (
    "ours submitit_slurm 2 nodes x 2 workers",
    "ours submitit_slurm 2 nodes x 2 workers, torch at top",
    "sbatch + srun torchrun (c10d)",
)
#: scontrol's job times -> marks (not phases: whole seconds).
SCONTROL = {"SubmitTime": "submitted", "StartTime": "scheduled", "EndTime": "job_end"}
#: Submit, wait until squeue no longer lists the job, fail unless it COMPLETED.
SUBMIT_AND_WAIT = """#!/bin/bash
jid=$(sbatch --parsable "$1") || exit 1
until out=$(squeue -h -j "$jid" -o %T) && [ -z "$out" ]; do sleep 0.2; done
scontrol show job -o "$jid" | grep -q JobState=COMPLETED
"""


def _job_times(job_ids: list[str], env: dict[str, str], start: float) -> dict[str, float]:
    """Submit / Start / End of the jobs (scontrol, whole seconds) as marks after ``start``."""
    marks: dict[str, float] = {}
    for job in job_ids:
        text = subprocess.run(
            ["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True
        ).stdout
        for key, mark in SCONTROL.items():
            m = re.search(rf"\b{key}=(\S+)", text)
            if m and m.group(1) not in ("Unknown", "None"):
                t = datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").timestamp() - start
                marks[mark] = max(marks.get(mark, t), t)
    return marks


def _probe(env: dict[str, str]) -> Callable[[Path, float], dict[str, float]]:
    """Marks from a finished run's files: the job ids, then scontrol's times; for sbatch,
    each agent's creation (the node-side process) from its _rss.py record."""

    def probe(work: Path, start: float) -> dict[str, float]:
        ids = [p.name for p in (work / "multi" / ".submitit").glob("[0-9]*")]
        ids += [p.read_text().strip() for p in work.glob("ranks/jobid_*")]
        marks = _job_times(ids, env, start)
        agents = [json.loads(p.read_text()) for p in work.glob("ranks/agent_*.json")]
        if agents:
            marks["node_proc"] = max(a["created"] for a in agents) - start
        return marks

    return probe


def ours_cmd(app: str = "bench_app.py") -> list[str]:
    """``app``: bench_app.py (torch imported in the task) or bench_app_top.py (at the top)."""
    return [
        str(HERE / app),
        "-m",
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.nodes=2",
        "hydra.launcher.tasks_per_node=1",
        "hydra.launcher.cpus_per_task=2",
        "hydra.launcher.timeout_min=60",
        "hydra/callbacks=[phases,torchrun]",
        "hydra.callbacks.torchrun.nproc_per_node=2",
        "hydra.sweep.dir=multi",
    ]


def sbatch_script(path: Path, port: int) -> Path:
    """The batch script users write: srun one torchrun agent per node, c10d on the head."""
    agent = (
        f"exec {shlex.quote(sys.executable)} {HERE / '_rss.py'} "
        '"$BENCH_OUT/agent_$SLURM_PROCID.json" -m torch.distributed.run --nnodes=2 '
        f"--nproc-per-node=2 --rdzv-backend=c10d --rdzv-endpoint=$head:{port} "
        f"--rdzv-id=$SLURM_JOB_ID {HERE / 'body.py'}"
    )
    path.write_text(
        "#!/bin/bash\n"
        "#SBATCH --nodes=2 --ntasks-per-node=1 --cpus-per-task=2 --time=60\n"
        "#SBATCH --output=slurm-%j.out\n"
        'echo "$SLURM_JOB_ID" > "$BENCH_OUT/jobid_$SLURM_JOB_ID"\n'
        'export head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)\n'
        f"srun bash -c {shlex.quote(agent)}\n"
    )
    return path


def compare(reps: int) -> list[tuple[str, list[Run]]]:
    """Start a sandbox, run both systems alternately ``reps`` times, stop it."""
    sys.path.insert(0, str(REPO))  # the source tree, not a copy installed in the venv
    from hydra_torchrun_callback.slurm_sandbox import SlurmSandbox

    base = Path(tempfile.mkdtemp(prefix="bench_slurm_"))
    runs: dict[str, list[Run]] = {name: [] for name in NAMES}
    with SlurmSandbox(base / "cluster", nodes=2, gpus=0).running() as sandbox:
        env = sandbox.env()
        probe = _probe(env)
        wait = base / "submit_and_wait.sh"
        wait.write_text(SUBMIT_AND_WAIT)
        for rep in range(reps):
            script = sbatch_script(base / f"job{rep}.sh", free_port())
            for name, cmd, wrap in (
                (NAMES[0], ours_cmd(), True),
                (NAMES[1], ours_cmd("bench_app_top.py"), True),
                (NAMES[2], ["bash", str(wait), str(script)], False),
            ):
                r = run([cmd], wrap=wrap, env=env, grace=GRACE, probe=probe)
                runs[name].append(r)
                print(f"slurm round {rep + 1}/{reps} {name}: {r.wall:.2f}s", file=sys.stderr)
    return list(runs.items())


def section(reps: int) -> str:
    """The report's SLURM section, or why it was skipped."""
    sys.path.insert(0, str(REPO))
    from hydra_torchrun_callback.slurm_sandbox import PACKAGES, SlurmSandbox

    missing = SlurmSandbox.missing_tools()
    if os.geteuid() != 0 or missing:
        return (
            f"Skipped: the SLURM sandbox needs root and Debian's {PACKAGES} "
            f"(missing: {', '.join(missing) or 'nothing'}; root: {os.geteuid() == 0})."
        )
    start = time.monotonic()
    results = compare(reps)
    rows = [
        "| system | wall s (median, min-max) | top process exit s | start -> 1st collective s "
        "| left alive |",
        "|---|---|---|---|---|",
    ]
    for name, runs in results:
        rows.append(
            f"| {name} | {med(runs, 'wall'):.2f} ({span(runs, 'wall')}) | "
            f"{med(runs, 'top_exit'):.2f} | {med(runs, 'first'):.2f} | "
            f"{max(values(runs, 'leftovers')):.0f} |"
        )
    sched = [
        "| scheduler's view (scontrol; s after start, whole seconds) | "
        + " | ".join(name for name, _ in results)
        + " |",
        "|---" * (len(results) + 1) + "|",
    ]
    for key, label in SCONTROL.items():
        cells = [[r.marks[label] for r in runs if label in r.marks] for _, runs in results]
        sched.append(
            f"| {key} | "
            + " | ".join(f"{statistics.median(c):.2f}" if c else "-" for c in cells)
            + " |"
        )
    theirs = med(results[-1][1], "wall")
    ratios = "; ".join(f"{name}: {med(runs, 'wall') / theirs:.2f}x" for name, runs in results[:-1])
    return "\n".join(
        [
            f"{reps} run(s) each, alternately, on the SLURM sandbox (2 slurmd on this machine, "
            f"1 task x 2 CPUs per node; section took {time.monotonic() - start:.0f} s with the "
            "cluster's start and stop). Wall = command start -> every process of the job gone "
            "(job processes keep exiting after the client returns).",
            "",
            *rows,
            "",
            f"Ours / sbatch (wall): {ratios}.",
            "",
            phase_table(results),
            "",
            *sched,
            "",
            "scontrol's times are truncated to the second (up to 1 s early); the phases above "
            "come from the processes' own clocks.",
        ]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    enable_subreaper()
    print("## SLURM: 2 nodes x 2 workers\n\n" + section(args.reps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
