"""Run one benchmarked command the way an outsider would time it, and collect its marks.

Shared by launch_overhead.py, steady_state.py and slurm_compare.py. Per run:

- two walls: until the top process(es) exited (``Popen.wait`` in a thread) and until every
  process of the run is gone: the stderr pipe closed (EOF), which also waits for helpers
  that outlive the top process (a forkserver, a submitit task), and no process carrying
  the run's unique ``BENCH_TAG`` environment variable is left (found via /proc/*/environ);
- leftovers: a tagged process still alive ``grace`` seconds after that is counted,
  reported loudly and killed by PID;
- CPU of the whole tree: this process is a child subreaper, so orphans (a forkserver whose
  parent exited) are re-parented here and reaped, and their CPU counts in RUSAGE_CHILDREN
  instead of vanishing into init;
- milestones (seconds after Popen) from the files the body, the phases callback and
  _rss.py write into ``$BENCH_OUT``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TAG_VAR = "BENCH_TAG"
_PR_SET_CHILD_SUBREAPER = 36
#: Milestones in time order; a phase runs from the previous milestone a run has to this one.
RANK_MARKS = ("created", "imported", "pg_init", "first_collective", "end")


@dataclass
class Run:
    """One run of one system. ``marks``: milestone -> seconds after Popen."""

    wall: float  # Popen -> every process gone (stderr pipe closed, no tagged process left)
    top_exit: float  # Popen -> the top process(es) exited
    cpu: float
    rss_mb: float
    leftovers: int
    marks: dict[str, float] = field(default_factory=dict)
    steps: list[float] = field(default_factory=list)  # steady state: rank 0's step seconds
    threads: int = 0  # steady state: torch threads in rank 0
    window_s: float = float("nan")  # steady state: seconds of the timed steps
    own_cpu_s: float = float("nan")  # steady state: rank 0's CPU seconds over them
    launcher_cpu_s: float = float("nan")  # steady state: every non-worker process's, meanwhile
    launcher_exited: int = 0  # steady state: non-worker processes that exited meanwhile
    gc_s: float = float("nan")  # steady state: rank 0's cyclic GC seconds over the steps
    gc_full: int = 0  # steady state: full (generation 2) collections meanwhile
    gc_tracked: int = 0  # steady state: objects rank 0's collector tracks (frozen ones not)
    gc_frozen: int = 0  # steady state: objects frozen out of its reach (gc.freeze)
    jobs: int = 1


def enable_subreaper() -> None:
    """Orphans of the benchmarked trees come to us (and their CPU to RUSAGE_CHILDREN)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print("warning: could not become a child subreaper; CPU may miss orphans", file=sys.stderr)


def _stat(pid: str) -> tuple[str, int]:
    """(state, ppid) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def _children(state: str | None = None) -> set[int]:
    """Our direct children (in ``state`` when given)."""
    found = set()
    for d in Path("/proc").glob("[0-9]*"):
        try:
            st, ppid = _stat(d.name)
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and (state is None or st == state):
            found.add(int(d.name))
    return found


def _reap(keep: set[int]) -> None:
    """Reap the orphans that died here (never ``keep``: children from before the run)."""
    for pid in _children("Z") - keep:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def tagged(tag: str) -> list[int]:
    """Live (not zombie) processes whose environment carries ``BENCH_TAG=tag``."""
    needle = f"{TAG_VAR}={tag}".encode()
    found = []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            if _stat(d.name)[0] != "Z" and needle in (d / "environ").read_bytes().split(b"\0"):
                found.append(int(d.name))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _kill_leftovers(left: list[int], tag: str, keep: set[int]) -> int:
    """Report and SIGKILL (by PID) what the run left alive; return how many."""
    if not left:
        return 0
    bar = "!" * 78
    print(
        f"{bar}\nWARNING: {len(left)} process(es) of this run still alive after it ended: "
        f"{left}; killing them\n{bar}",
        file=sys.stderr,
    )
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while tagged(tag) and time.monotonic() < deadline:
        _reap(keep)
        time.sleep(0.05)
    _reap(keep)
    return len(left)


def free_port() -> int:
    """A free TCP port for a rendezvous endpoint picked by hand."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def bench_env(out: Path, tag: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a run: no scheduler or torchrun leftovers from ours, the tag."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SUBMITIT_", "TORCHELASTIC_")) and k not in drop
    }
    env["BENCH_OUT"] = str(out)
    env[TAG_VAR] = tag
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), env.get("PYTHONPATH", "")])
    env.update(extra or {})
    return env


def _load(paths: list[Path]) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in paths]


def collect_marks(
    out: Path, start: float, top: dict[str, Any], top_pids: set[int]
) -> dict[str, float]:
    """Milestones (seconds after ``start``) from what the run wrote into ``out``.

    Rank milestones are the latest rank's (the job reaches a point when its last rank
    does); ``top`` is the first top process's _rss.py record.
    """
    marks: dict[str, float] = {}
    if "python_up" in top:
        marks["python_up"] = top["python_up"] - start
    hydras = _load(sorted(out.glob("hydra_*.json")))
    mine = [h for h in hydras if h.get("pid") in top_pids]
    if mine and "composed" in mine[0]:
        marks["composed"] = mine[0]["composed"] - start
    jobs = [j for h in mine for j in h.get("jobs", [])]
    nodes = [h for h in hydras if h.get("pid") not in top_pids]  # submitit tasks (nodes)
    if nodes:
        marks["node_proc"] = max(h["created"] for h in nodes) - start
        jobs = [j for h in nodes for j in h.get("jobs", [])]
    if jobs:
        marks["job_start"] = max(j["job_start"] for j in jobs) - start
        results = [j["result"] for j in jobs if "result" in j]
        if results:
            marks["result"] = max(results) - start
    ranks = _load(sorted(out.glob("rank*.json")))
    for key in RANK_MARKS:
        values = [r[key] for r in ranks if key in r]
        if values:
            marks[key] = max(values) - start
    return marks


def run(
    cmds: list[list[str]],
    jobs: int = 1,
    env: dict[str, str] | None = None,
    wrap: bool = True,
    timeout: float = 900,
    grace: float = 1.0,
    probe: Callable[[Path, float], dict[str, float]] | None = None,
    python: str = sys.executable,
) -> Run:
    """Run the commands at once (several = several agents by hand) and wait for all.

    ``wrap``: run each as ``python _rss.py ... CMD`` (Python commands) for peak RSS and
    the interpreter's start; otherwise CMD is executed as is (sbatch). The run ends when
    the top processes exited, the stderr pipe closed and no tagged process is left; one
    still there ``grace`` seconds later is a leftover. ``probe(work_dir, start)`` adds
    marks the run's files hold before the work dir is removed. ``python``: the interpreter
    (of a venv) that runs the wrapped commands.
    """
    work = Path(tempfile.mkdtemp(prefix="bench_"))
    out = work / "ranks"
    out.mkdir()
    tag = uuid.uuid4().hex
    rss_files = [work / f"rss{i}.json" for i in range(len(cmds))]
    keep = _children()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [python, str(HERE / "_rss.py"), str(rss), *cmd] if wrap else cmd,
            cwd=work,
            env=bench_env(out, tag, env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for cmd, rss in zip(cmds, rss_files, strict=True)
    ]
    exits = [float("nan")] * len(procs)
    eofs = [float("nan")] * len(procs)
    errors = [b""] * len(procs)

    def wait(i: int) -> None:
        procs[i].wait()
        exits[i] = time.monotonic() - t0

    def read(i: int) -> None:
        stream = procs[i].stderr
        assert stream is not None
        errors[i] = stream.read()
        eofs[i] = time.monotonic() - t0

    threads = [
        threading.Thread(target=f, args=(i,)) for i in range(len(procs)) for f in (wait, read)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    timed_out = any(t.is_alive() for t in threads)
    if timed_out:
        for p in procs:
            p.kill()
        _kill_leftovers(tagged(tag), tag, keep)
        for t in threads:
            t.join()
    gone = max(*eofs, *exits)
    _reap(keep)
    left = tagged(tag)
    if left:  # still exiting (closed its stderr first) or left behind: give it ``grace``
        deadline = time.monotonic() + grace
        while left and time.monotonic() < deadline:
            time.sleep(0.02)
            _reap(keep)
            left = tagged(tag)
        if not left:
            gone = time.monotonic() - t0
    leftovers = _kill_leftovers(left, tag, keep)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    for p, err in zip(procs, errors, strict=True):
        if timed_out or p.returncode != 0:
            shutil.rmtree(work, ignore_errors=True)
            why = f"timed out after {timeout:.0f} s" if timed_out else f"exit {p.returncode}"
            raise RuntimeError(f"{cmds} failed ({why}):\n{err.decode(errors='replace')[-3000:]}")
    tops = [json.loads(r.read_text()) for r in rss_files if r.exists()]
    marks = collect_marks(out, start, tops[0] if tops else {}, {p.pid for p in procs})
    marks["top_exit"] = max(exits)
    marks["gone"] = gone
    if probe is not None:
        marks.update(probe(work, start))
    steps = _load(sorted(out.glob("steps_*.json")))
    rank0: dict[str, Any] = steps[0] if steps else {}  # the steady-state body's record
    nan = float("nan")
    shutil.rmtree(work, ignore_errors=True)
    return Run(
        wall=marks["gone"],
        top_exit=marks["top_exit"],
        cpu=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        rss_mb=max((t["maxrss_kib"] for t in tops), default=0) / 1024,
        leftovers=leftovers,
        marks=marks,
        steps=rank0.get("step_s", []),
        threads=rank0.get("threads", 0),
        window_s=rank0.get("window_s", nan),
        own_cpu_s=rank0.get("own_cpu_s", nan),
        launcher_cpu_s=rank0.get("launcher_cpu_s", nan),
        launcher_exited=rank0.get("launcher_exited", 0),
        gc_s=rank0.get("gc_s", nan),
        gc_full=rank0.get("gc_collections", [0, 0, 0])[2],
        gc_tracked=rank0.get("gc_tracked", 0),
        gc_frozen=rank0.get("gc_frozen", 0),
        jobs=jobs,
    )
