"""Process-tree helpers read from /proc (Linux), shared by the agent and the sandbox,
and where this node's processes are: the agent runs in the Hydra process, or (the
default, see ``_node.agent_host``) in a fork of the warm server, beside the workers."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

__all__ = [
    "SHIELDED",
    "AgentHost",
    "agent_host",
    "alive",
    "descendants",
    "die_with_parent",
    "job_pid",
    "parent_of",
    "restore_signals",
    "set_agent_host",
    "shield_signals",
    "start_time",
    "stop_self",
    "worker_root",
]


@dataclass(frozen=True)
class AgentHost:
    """Set in an agent that runs in a fork of the warm server (never in the Hydra process).

    Its stop signals are blocked (scancel signals every process of the step, Ctrl-C the
    whole process group: each must reach the agent once), so it stops itself through
    ``stop``, which raises the signal in its main thread."""

    hydra_pid: int  #: the Hydra job's process: signals and stack requests go there
    server_pid: int  #: the warm server: the workers' parent, this agent's too
    stop: Callable[[int], None]  #: raise a stop signal in the agent's main thread
    preempted: Callable[[int, Any], None]  #: hand a preemption to the Hydra process


_host: Optional[AgentHost] = None


def set_agent_host(host: Optional[AgentHost]) -> None:
    global _host
    _host = host


def agent_host() -> Optional[AgentHost]:
    """The agent's host, when the agent runs in a fork of the warm server."""
    return _host


def job_pid() -> int:
    """The Hydra job's process (the one users and launchers know and signal)."""
    return _host.hydra_pid if _host is not None else os.getpid()


def worker_root() -> int:
    """The process whose descendants are this node's workers: this one, or the warm
    server when the agent is its fork (the workers are then the agent's siblings)."""
    return _host.server_pid if _host is not None else os.getpid()


def stop_self(signum: int = signal.SIGTERM) -> None:
    """Stop this node's agent as the signal would (its handler raises in the main thread)."""
    if _host is not None:
        _host.stop(signum)
    else:
        os.kill(os.getpid(), signum)


def _state_and_parent(stat: Path) -> tuple[str, int]:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def start_time(pid: int) -> Optional[str]:
    """When ``pid`` started (clock ticks since boot, /proc/<pid>/stat field 22): with the
    pid, it names one process (a recorded pid may be reused later). None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[int]:
    """Live (non-zombie) descendants of ``pid``, parents before their children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            state, parent = _state_and_parent(stat)
            if state != "Z":
                children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pids: list[int]) -> list[int]:
    """The ones among ``pids`` that still run (zombies count as gone)."""
    out = []
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            if _state_and_parent(Path(f"/proc/{pid}/stat"))[0] != "Z":
                out.append(pid)
    return out


def parent_of(pid: int) -> Optional[int]:
    """The parent pid of ``pid``; None if it is gone."""
    try:
        return _state_and_parent(Path(f"/proc/{pid}/stat"))[1]
    except (OSError, ValueError, IndexError):
        return None


def die_with_parent(parent: int, signum: int = 9) -> bool:
    """Linux: have the kernel send ``signum`` (SIGKILL) to this process when ``parent``,
    its parent, dies (``PR_SET_PDEATHSIG``). Exits at once if ``parent`` died already
    (before prctl took effect). False where it cannot be set."""
    if not sys.platform.startswith("linux") or os.getppid() != parent:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if int(libc.prctl(1, signum)) != 0:  # PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:
        os._exit(1)
    return True


#: Signals the server ignores. SLURM delivers scancel's, a time limit's and the
#: preemption warning's signals to every process of a step: the server, whose death
#: SIGKILLs the agent and the workers (their death signal), must outlive them so the
#: agent can stop its workers in order (stack dumps, summary) or hand a preemption on.
#: It still dies with the Hydra process. Its forks put back what it had.
SHIELDED = tuple(
    getattr(signal, name)
    for name in ("SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
    if hasattr(signal, name)
)

_before_shield: dict[int, Any] = {}


def shield_signals() -> None:
    """In the warm server: ignore :data:`SHIELDED` (see there); its forks put them back."""
    for sig in SHIELDED:
        _before_shield[sig] = signal.signal(sig, signal.SIG_IGN)


def restore_signals() -> None:
    """In a fork of the server (a worker, the agent): the signal dispositions the server
    started with (what the Hydra process had: a signal it ignored stays ignored)."""
    for sig, handler in _before_shield.items():
        with contextlib.suppress(ValueError, TypeError, OSError):
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    _before_shield.clear()
