"""Inspect a run or a sweep: one line per job from its ``torchrun_summary.json``.

A sweep started with the callback is shown first as a sweep, while it runs too: its
controller (alive or not, where, its log), each point's state (pending, running with its
job id, completed with its value, failed with its root cause) and the command that
resumes it. ``hydra-torchrun-cancel <sweep dir>`` stops its controller and its jobs.

    python -m hydra_torchrun_callback.summary multirun/2026-11-22/12-00-00
    python -m hydra_torchrun_callback.summary outputs/ --ranks     # each job's rank table too
    python -m hydra_torchrun_callback.summary multirun/... --json  # for scripts
    hydra-torchrun-summary --stacks outputs/2026-11-22/12-00-00    # where is each rank now?

``--stacks`` asks every node of each running job under the folder to dump its ranks'
Python stacks (nothing stops) and prints the ranks grouped by where they are; each
rank's full dump is appended to its log. It works from any host that sees the output dir.

Exit status: 0 when every job found COMPLETED (``--stacks``: every node answered), 1 when
some did not, 2 when none was found.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import yaml

from hydra_torchrun_callback._report.job_summary import clip, format_columns, render_table
from hydra_torchrun_callback._wire.protocol import SUMMARY_FILE

__all__ = ["cancel_main", "collect", "main"]


def _overrides(job_dir: Path) -> list[str]:
    try:
        found = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    return [str(o) for o in found] if isinstance(found, list) else []


def _natural(path: Path) -> list[tuple[int, str]]:
    """Sweep job 2 before job 10."""
    return [(0, f"{int(p):012d}") if p.isdigit() else (1, p) for p in path.parts]


def collect(root: Path) -> list[dict[str, Any]]:
    """Every job summary under ``root`` (a job dir, a sweep dir or a whole outputs tree)."""
    jobs = []
    for path in sorted(root.rglob(SUMMARY_FILE), key=_natural):
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        job_dir = path.parent
        name = str(job_dir.relative_to(root)) if job_dir != root else "."
        jobs.append({"job": name, "overrides": _overrides(job_dir), **summary})
    return jobs


def _root_cause(job: dict[str, Any]) -> str:
    """ "rank 1: ValueError: boom" when a rank is to blame, else the error's first line."""
    rank = job.get("root_cause_rank")
    for row in job["ranks"]:
        if rank is not None and row["rank"] == rank and row.get("root_cause"):
            return f"rank {rank}: {row['root_cause']}"
    return str(job["root_cause"] or "").split("\n", 1)[0]


def jobs_table(jobs: Sequence[dict[str, Any]]) -> str:
    columns = ("job", "overrides", "status", "nodes x workers", "wall", "attempts", "root cause")
    lines = [
        (
            job["job"],
            clip(" ".join(job["overrides"]), 40),
            job["status"],
            f"{job['nnodes']} x {job['nproc_per_node']}",
            f"{job['wall_s']:.1f}s",
            str(max((r["attempts"] for r in job["ranks"]), default=0)),
            clip(_root_cause(job), 70),
        )
        for job in jobs
    ]
    counts = Counter(job["status"] for job in jobs)
    head = f"{len(jobs)} job(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return "\n".join([head, *format_columns(columns, lines)])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hydra_torchrun_callback.summary",
        description="One line per job from the torchrun_summary.json files under a directory.",
    )
    parser.add_argument("root", type=Path, help="a job, sweep or outputs directory")
    parser.add_argument("--ranks", action="store_true", help="also print each job's rank table")
    parser.add_argument("--json", action="store_true", help="print the summaries as JSON")
    parser.add_argument(
        "--stacks",
        action="store_true",
        help="dump and print the Python stacks of every rank of the running job(s)",
    )
    parser.add_argument(
        "--full", action="store_true", help="with --stacks: print every thread of each group"
    )
    parser.add_argument(
        "--timeout", type=float, default=15.0, help="with --stacks: seconds to wait for nodes"
    )
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"{args.root} is not a directory")
    if args.stacks:
        return _stacks(args.root, args.timeout, args.full, args.json)
    jobs = collect(args.root)
    from hydra_torchrun_callback._sweep.view import is_sweep, render_sweep, sweep_status

    if is_sweep(args.root):
        status = sweep_status(args.root)
        if args.json:
            print(json.dumps({"sweep": status, "jobs": jobs}, indent=2, default=str))
        else:
            print(render_sweep(status))
            if jobs:
                print("\n" + jobs_table(jobs))
            if args.ranks:
                for job in jobs:
                    print(f"\n{job['job']}: " + render_table(job))
        done = all(p["state"] == "completed" for p in status["points"])
        return 0 if done and status["points"] else 1
    if not jobs:
        print(f"no {SUMMARY_FILE} under {args.root} (was summary=false?)", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(jobs, indent=2))
    else:
        print(jobs_table(jobs))
        if args.ranks:
            for job in jobs:
                print(f"\n{job['job']}: " + render_table(job))
    return 0 if all(job["status"] == "COMPLETED" for job in jobs) else 1


def cancel_main(argv: Optional[Sequence[str]] = None) -> int:
    """``hydra-torchrun-cancel <sweep dir>``: the sweep's controller, then its point jobs."""
    parser = argparse.ArgumentParser(
        prog="hydra-torchrun-cancel",
        description="Cancel a sweep started with hydra/callbacks=torchrun: its controller "
        "(a SLURM job or a local process), then every point job it submitted that still runs.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the sweep's hydra.sweep.dir")
    parser.add_argument(
        "--controller-only",
        action="store_true",
        help="stop the controller only: its SLURM point jobs run on (resume re-attaches)",
    )
    args = parser.parse_args(argv)
    from hydra_torchrun_callback._sweep.view import cancel_sweep, is_sweep

    if not is_sweep(args.sweep_dir):
        parser.error(f"{args.sweep_dir} holds no sweep started with hydra/callbacks=torchrun")
    from hydra_torchrun_callback._result import TorchrunSetupError

    try:
        lines = cancel_sweep(args.sweep_dir, args.controller_only)
    except TorchrunSetupError as exc:
        print(f"hydra-torchrun-cancel: {exc}", file=sys.stderr)
        return 1
    for line in lines or ["nothing was running"]:
        print(line)
    return 0


def _stacks(root: Path, timeout: float, full: bool, as_json: bool) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from hydra_torchrun_callback._report.stacks import (
        NoRunningJob,
        render_stacks,
        request_stacks,
        running_jobs,
    )

    jobs = running_jobs(root)
    if not jobs:
        print(
            f"no running torchrun job under {root} (a job's folder holds "
            ".torchrun_stacks/job.json while it runs)",
            file=sys.stderr,
        )
        return 2

    def ask(job: Path) -> Optional[dict[str, Any]]:
        try:
            return request_stacks(job, timeout)
        except (NoRunningJob, OSError):  # it ended meanwhile
            return None

    with ThreadPoolExecutor(max_workers=min(16, len(jobs))) as pool:
        answered = [(j, r) for j, r in zip(jobs, pool.map(ask, jobs), strict=True) if r is not None]
    if not answered:
        print(f"the job(s) under {root} ended before they could answer", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps([{"job": str(j), **r} for j, r in answered], indent=2))
    else:
        print("\n\n".join(render_stacks(str(j), r, full) for j, r in answered))
    return 0 if all(not r["missing_nodes"] for _, r in answered) else 1


if __name__ == "__main__":
    sys.exit(main())
