"""The processes of a SLURM sandbox's daemons: started, waited for, stopped by PID; and the
sandbox's teardown (its jobs, its daemons, its left-over job steps)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from hydra_torchrun_callback._proc import alive, descendants
from hydra_torchrun_callback._sandbox.files import Layout

__all__ = ["SERVICES", "Daemons", "Teardown", "recorded_pids", "which"]

#: Stopped after slurmctld and the slurmds (slurmctld flushes to slurmdbd), in this order.
SERVICES = (("slurmdbd",), ("mariadbd", "munged"))


def which(tool: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(tool, path=path)


def _terminate(pids: list[int], deadline: float) -> list[int]:
    """SIGTERM ``pids`` and their descendants; SIGKILL what is left at ``deadline``.
    Returns the ones that had to be killed."""
    killed = []
    tree = [p for pid in pids for p in descendants(pid)]
    for pid in pids + tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in pids + tree:
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
            if not alive([pid]):  # gone, or a zombie its parent has yet to reap
                break
            time.sleep(0.05)
        else:
            killed.append(pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return killed


@dataclass
class Daemons:
    """The daemons' processes: start one (as a fake node with ``host``), wait until one is
    ready, retire some. ``pids`` and ``procs`` are the sandbox's own dicts, updated in place;
    the PIDs are also written to the layout's ``state`` after each start."""

    layout: Layout
    env: dict[str, str]
    log: IO[bytes]
    pids: dict[str, int]
    procs: dict[str, subprocess.Popen[bytes]]

    def spawn(self, name: str, argv: list[str], host: str = "") -> subprocess.Popen[bytes]:
        """Start one daemon in its own session; with ``host``, in private mount + UTS
        namespaces with that hostname and the sandbox's hosts / resolv.conf. ``exec`` keeps
        one PID per daemon, recorded (also in run/sandbox.json) so stop() can end it."""
        argv = [which(argv[0]) or argv[0], *argv[1:]]  # munged & co. are in /usr/sbin
        if host:
            b = self.layout.base
            script = (
                f"mount --bind {b}/etc/hosts /etc/hosts && "
                f"mount --bind {b}/etc/resolv.conf /etc/resolv.conf && "
                f"hostname {host} && exec {shlex.join(argv)}"
            )
            argv = ["unshare", "-m", "-u", "--propagation", "private", "sh", "-c", script]
        proc = subprocess.Popen(
            argv, env=self.env, stdout=self.log, stderr=self.log, start_new_session=True
        )
        self.pids[name] = proc.pid
        self.procs[name] = proc
        self.layout.state.write_text(json.dumps(self.pids))
        return proc

    def wait(self, what: str, ready: Callable[[], bool], deadline: float) -> None:
        """Until ``ready()``; fail as soon as a daemon we started has exited."""
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"SLURM sandbox: {name} exited ({proc.returncode}) while waiting for "
                        f"{what}; see {self.layout.logs}"
                    )
            if ready():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"SLURM sandbox: {what} not ready in time; see {self.layout.logs}"
                )
            time.sleep(0.05)

    def retire(self, names: tuple[str, ...], deadline: float) -> list[int]:
        """Stop the daemons ``names`` and forget them; returns the PIDs that had to be killed."""
        killed = _terminate([self.pids.pop(n) for n in names], deadline)
        for name in names:
            self.procs.pop(name).poll()
        return killed


def recorded_pids(layout: Layout) -> dict[str, int]:
    """The daemons another process (the CLI) started, as recorded in ``layout.state``:
    only what still runs with this sandbox's config."""
    recorded = {k: int(v) for k, v in json.loads(layout.state.read_text()).items()}
    return {k: v for k, v in recorded.items() if _ours(layout, v)}


def _ours(layout: Layout, pid: int) -> bool:
    """Whether ``pid`` is a daemon of this sandbox (each runs with its SLURM_CONF)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"SLURM_CONF={layout.conf}".encode() in environ


# -- stopping --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Teardown:
    """Stops a sandbox: cancels its jobs, stops its daemons by PID (Slurm's first, then
    SERVICES in order) and what they started, and kills job steps left over."""

    layout: Layout
    pids: dict[str, int]

    def run(self, env: dict[str, str], timeout: float) -> None:
        if "slurmctld" in self.pids:
            deadline = time.monotonic() + timeout
            with contextlib.suppress(Exception):
                subprocess.run(["scancel", "--full", "--quiet", "-p", "debug"], env=env, timeout=10)
            # Steps end within KillWait (5 s) and report to slurmctld, which must be up then.
            while self.job_processes() and time.monotonic() < deadline:
                time.sleep(0.1)
        deadline = time.monotonic() + timeout
        services = [name for stage in SERVICES for name in stage]
        _terminate([self.pids[k] for k in self.pids if k not in services], deadline)
        # Steps that outlived scancel (e.g. one retrying to reach a stopped slurmctld) and
        # ignore SIGTERM, as slurmstepd does, and what they still run.
        leftovers = self.job_processes()
        for pid in leftovers + [child for p in leftovers for child in descendants(p)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for stage in SERVICES:
            _terminate([self.pids[k] for k in stage if k in self.pids], deadline)

    def job_processes(self) -> list[int]:
        """Live slurmstepds and job processes of this sandbox (they carry its SLURM_CONF),
        not this process or its ancestors (``stop`` may be called from inside a job)."""
        needle = f"SLURM_CONF={self.layout.conf}".encode()
        mine, pid = set(), os.getpid()
        while pid > 1 and pid not in mine:
            mine.add(pid)
            try:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                break
        found, daemons = [], set(self.pids.values())
        for environ in Path("/proc").glob("[0-9]*/environ"):
            pid = int(environ.parent.name)
            try:
                entries = environ.read_bytes().split(b"\0")
                comm = (environ.parent / "comm").read_text().strip()
            except OSError:
                continue
            in_job = comm == "slurmstepd" or any(e.startswith(b"SLURM_JOB_ID=") for e in entries)
            if pid not in mine and pid not in daemons and needle in entries and in_job:
                found.append(pid)
        return alive(found)
