"""Elastic recovery on emulated nodes: from losing a node to training again.

A 3-node job (``hydra/launcher=submitit_local``, 3 tasks, 1 gloo worker per node) runs
``tests/apps/elastic_app.py`` (an all_reduce every 0.5 s, rank 0 checkpoints each step);
once it trains, one node's whole task (Hydra process, warm server, agent, worker) is
SIGKILLed. Per case, the median / min / max over ``--reps`` runs of:

- **re-formed**: the loss -> the first worker of the re-formed group started (its own
  wall-clock stamp in ``starts.jsonl``);
- **job end**: the loss -> the multirun command exited (and its exit status).

Cases (default options unless named):

- ``collective``: nnodes=2:3, max_restarts=2, node 2 lost while the survivors sit in an
  all_reduce with it (gloo fails them at once; torch's agents re-rendezvous);
- ``idle``: the same, the survivors idle in no collective (the job's heartbeats notice
  the loss after ``peer_timeout``, and the survivors stop their workers);
- ``fixed``: nnodes unset (3:3), the control: the job fails fast;
- ``below-min``: nnodes=2:3, nodes 1 and 2 lost: the job fails, naming both;
- ``node0``: as ``collective``, node 0 lost (the store and rendezvous are files in
  submitit's folder: node 1 leads the rest of the job);
- ``spare``: 4 tasks for nnodes=2:3, a node of the group lost: the spare takes its place.

Run: ``python benchmarks/elastic_recovery.py --reps 3 [--cases collective,idle] [--out F]``.
The README's figures: ``--reps 2`` on the 2-core CI machine (torch 2.13).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
APPS = REPO / "tests" / "apps"

COMMON = [
    "hydra/launcher=submitit_local",
    "hydra.launcher.timeout_min=30",
    "hydra/callbacks=torchrun",
    "hydra.callbacks.torchrun.nproc_per_node=1",
]
ELASTIC = ["hydra.callbacks.torchrun.nnodes=2:3", "hydra.callbacks.torchrun.max_restarts=2"]
#: name -> (overrides, nodes lost (-1: the highest node of the first group), tasks)
CASES: dict[str, tuple[list[str], list[int], int]] = {
    "collective": ([*ELASTIC, "+steps=60"], [2], 3),
    "idle": ([*ELASTIC, "+steps=60", "+hold_s=600"], [2], 3),
    "fixed": (["+steps=400"], [2], 3),
    "below-min": ([*ELASTIC, "+steps=400"], [1, 2], 3),
    "node0": ([*ELASTIC, "+steps=60"], [0], 3),
    "spare": ([*ELASTIC, "+steps=60"], [-1], 4),
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(APPS), env.get("PYTHONPATH", "")])
    return env


def _starts(job_dir: Path) -> list[dict[str, Any]]:
    path = job_dir / "starts.jsonl"
    found = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            found.append(json.loads(line))
    return found


def _step(job_dir: Path) -> int:
    try:
        return int(json.loads((job_dir / "ckpt.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def _lose(hydra_pid: int) -> None:
    sys.path.insert(0, str(REPO))
    from hydra_torchrun_callback._proc import descendants

    for pid in [hydra_pid, *descendants(hydra_pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_case(name: str, workdir: Path) -> dict[str, Any]:
    overrides, victims, tasks = CASES[name]
    multi = workdir / "multi"
    job_dir = multi / "0"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(APPS / "elastic_app.py"),
            "-m",
            *COMMON,
            f"hydra.launcher.tasks_per_node={tasks}",
            *overrides,
            f"hydra.sweep.dir={multi}",
        ],
        cwd=workdir,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        threshold = 3 if "+hold_s=600" in overrides else 2
        while len(_starts(job_dir)) < 3 or _step(job_dir) < threshold:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name}: the job never trained (exit {proc.poll()})")
            time.sleep(0.1)
        pids = {s["node"]: s["hydra_pid"] for s in _starts(job_dir) if s["restart"] == 0}
        lost_wall, lost = time.time(), time.monotonic()
        for node in victims:
            _lose(pids[max(pids) if node < 0 else node])
        code = proc.wait(timeout=600)
        ended = time.monotonic() - lost
    finally:
        if proc.poll() is None:
            proc.kill()
    again = [s["at"] for s in _starts(job_dir) if s["at"] > lost_wall]
    return {
        "reformed": min(again) - lost_wall if again else None,
        "ended": ended,
        "exit": code,
    }


def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    lines = [
        "| case | re-formed after loss, s: median (min-max) | job end after loss, s | exit |",
        "|---|---|---|---|",
    ]
    for name in args.cases.split(","):
        runs = []
        for _ in range(args.reps):
            with tempfile.TemporaryDirectory(prefix="elastic_bench_") as tmp:
                runs.append(run_case(name, Path(tmp)))
        reformed = [r["reformed"] for r in runs if r["reformed"] is not None]
        exits = sorted({r["exit"] for r in runs})
        lines.append(
            f"| {name} | {_cell(reformed)} | {_cell([r['ended'] for r in runs])} | {exits} |"
        )
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(
            f"# Elastic recovery ({args.reps} reps, `python benchmarks/elastic_recovery.py "
            f"--reps {args.reps} --cases {args.cases}`)\n\n{table}\n"
        )


if __name__ == "__main__":
    main()
