"""A sweep as the user's shell sees it (``hydra-torchrun-summary <sweep dir>``), and its
cancellation (``hydra-torchrun-cancel <sweep dir>``).

Read from the sweep dir only (and squeue for SLURM jobs), from any host that sees it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from hydra_torchrun_callback._proc import start_time
from hydra_torchrun_callback._sweep import scheduler
from hydra_torchrun_callback._wire import sweep_files
from hydra_torchrun_callback._wire.protocol import POINT_FILE, SWEEP_STATE_DIR

__all__ = ["cancel_sweep", "is_sweep", "render_sweep", "sweep_status"]


def is_sweep(root: Path) -> bool:
    return sweep_files.read_sweep(root) is not None


def _local_alive(record: Mapping[str, Any]) -> Optional[bool]:
    """Whether a local controller's process lives (None: another host, cannot tell)."""
    pid = record.get("pid")
    if not isinstance(pid, int) or record.get("host") != socket.gethostname():
        return None
    start = start_time(pid)
    return start is not None and start == record.get("pid_start")


def _controller(root: Path, states: Mapping[str, str]) -> dict[str, Any]:
    record = sweep_files.read_controller(root) or {}
    out: dict[str, Any] = {
        "kind": record.get("kind"),
        "state": record.get("state"),
        "log": record.get("log"),
        "host": record.get("host"),
        "pid": record.get("pid"),
        "slurm_job": record.get("slurm_job"),
    }
    if record.get("beat"):
        out["seen_s_ago"] = round(time.time() - float(record["beat"]), 1)
    job = record.get("slurm_job")
    if job:
        out["slurm_state"] = states.get(str(job))
        out["alive"] = states.get(str(job)) in scheduler.LIVE_STATES
    else:
        alive = _local_alive(record)
        if alive is None:  # another host: its heartbeat says
            alive = record.get("state") == "running" and out.get("seen_s_ago", 1e9) < 60
        out["alive"] = alive
    return out


def _records(root: Path, sweep_id: str) -> dict[int, tuple[Path, dict[str, Any]]]:
    found: dict[int, tuple[Path, dict[str, Any]]] = {}
    for path in root.rglob(POINT_FILE):
        if SWEEP_STATE_DIR in path.parts:
            continue
        record = sweep_files.read_json(path)
        if record and record.get("sweep_id") == sweep_id and isinstance(record.get("num"), int):
            found[int(record["num"])] = (path.parent, record)
    return found


def _value(job_dir: Path, sweep_id: str, record: Mapping[str, Any]) -> str:
    from hydra_torchrun_callback._wire import pickling

    key = sweep_files.point_key(sweep_id, int(record["num"]), record.get("overrides", []))
    try:
        data = sweep_files.open_value(job_dir, key)
    except Exception as exc:  # e.g. no key file readable here
        return f"(value not verifiable here: {exc})"
    if data is None:
        return "(no verified value)"
    try:
        return repr(pickling.loads(data))
    except Exception as exc:
        return f"(value cannot be loaded here: {type(exc).__name__})"


def sweep_status(root: Path) -> dict[str, Any]:
    """The sweep's controller and every point it started, as the sweep dir and SLURM say."""
    root = root.absolute()
    info = sweep_files.read_sweep(root) or {}
    sweep_id = str(info.get("id", ""))
    ledger = sweep_files.read_ledger(root, sweep_id)
    records = _records(root, sweep_id)
    lasts = {num: e["jobs"][-1] for num, e in ledger.items() if e.get("jobs")}
    slurm = [str(j.get("job_id")) for j in lasts.values() if j.get("executor") == "slurm"]
    controller_job = (sweep_files.read_controller(root) or {}).get("slurm_job")
    unknown = ""
    try:
        states = scheduler.job_states([*slurm, *([str(controller_job)] if controller_job else [])])
    except Exception as exc:  # no squeue here: say so rather than call every job lost
        states, unknown = {}, str(exc).split(". Fix")[0]
    controller = _controller(root, states)
    if unknown and controller_job:
        controller["alive"] = None
    points = []
    for num in sorted(set(ledger) | set(records)):
        entry = ledger.get(num, {})
        last = (entry.get("jobs") or [{}])[-1]
        job_id = str(last.get("job_id")) if last.get("job_id") else None
        job_dir, record = records.get(num, (None, {}))
        state = str(record.get("state") or "submitted")
        point: dict[str, Any] = {
            "num": num,
            "overrides": record.get("overrides") or entry.get("overrides") or [],
            "dir": str(job_dir) if job_dir else None,
            "job_id": job_id,
            "attempts": len(record.get("attempts", [])),
        }
        slurm_state = states.get(job_id or "") if last.get("executor") == "slurm" else None
        if state == "completed" and job_dir is not None:
            point["value"] = _value(job_dir, sweep_id, record)
        elif state == "failed":
            point["cause"] = str(record["attempts"][-1].get("cause") or "").split("\n")[0]
        elif last.get("executor") == "slurm" and unknown:
            state = "unknown"
            point["cause"] = unknown
        elif last.get("executor") == "slurm":
            if slurm_state == "PENDING":
                state = "pending"
            elif slurm_state in scheduler.LIVE_STATES:
                state = "running"
            else:
                state = "lost"
                point["cause"] = f"job {job_id} ended without a result"
        elif not controller.get("alive"):
            state = "lost"  # local points stop with their controller
            point["cause"] = "its controller is gone"
        elif state == "submitted":
            state = "pending"
        point["state"] = state
        points.append(point)
    return {
        "sweep_dir": str(root),
        "sweep_id": sweep_id,
        "app": info.get("app"),
        "task_overrides": info.get("task_overrides"),
        "controller": controller,
        "points": points,
        "resume": _resume(info),
        "scheduler_error": unknown or None,
        "cancel": f"hydra-torchrun-cancel {root}",
    }


def _resume(info: Mapping[str, Any]) -> str:
    from hydra_torchrun_callback._sweep.control import resume_command

    return resume_command(info) if info.get("command") else ""


def render_sweep(status: Mapping[str, Any]) -> str:
    from hydra_torchrun_callback._report.job_summary import clip, format_columns

    c = status["controller"]
    where = (
        f"SLURM job {c['slurm_job']} ({c.get('slurm_state') or 'not in squeue'})"
        if c.get("slurm_job")
        else f"pid {c.get('pid')} on {c.get('host')}"
        + (" (the sweep's own command)" if c.get("kind") == "foreground" else "")
    )
    alive = "not running" if c.get("alive") is not None else "unknown (squeue failed)"
    if c.get("alive"):
        alive = "alive" if c.get("state") in ("running", "submitted", None) else "shutting down"
    seen = f", last seen {c['seen_s_ago']:.0f} s ago" if "seen_s_ago" in c else ""
    lines = [
        f"sweep {status['sweep_dir']} ({status['app']}: "
        f"{' '.join(status['task_overrides'] or [])})",
        f"controller: {alive}, {where}, state {c.get('state')}{seen}; log {c.get('log')}",
    ]
    rows = []
    for p in status["points"]:
        detail = p.get("value") or p.get("cause") or ""
        job = p.get("job_id") or ""
        rows.append(
            (
                f"#{p['num']}",
                clip(" ".join(p["overrides"]), 40),
                p["state"],
                job,
                str(p["attempts"]),
                clip(str(detail), 60),
            )
        )
    counts: dict[str, int] = {}
    for p in status["points"]:
        counts[p["state"]] = counts.get(p["state"], 0) + 1
    lines.append(
        f"{len(rows)} point(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    )
    lines += format_columns(
        ("point", "overrides", "state", "job", "attempts", "value / cause"), rows
    )
    if status["resume"]:
        lines.append(f"resume: {status['resume']}")
    lines.append(f"cancel: {status['cancel']}")
    return "\n".join(lines)


def cancel_sweep(root: Path, controller_only: bool = False) -> list[str]:
    """Stop the sweep's controller, then every point job it submitted that still lives."""
    done: list[str] = []
    info = sweep_files.read_sweep(root) or {}
    record = sweep_files.read_controller(root) or {}
    job = record.get("slurm_job")
    stopped = False
    if job:
        err = scheduler.scancel([str(job)])
        done.append(f"controller SLURM job {job}: scancel" + (f" ({err})" if err else ""))
        stopped = not err
        deadline = time.monotonic() + 60  # its last submissions reach the ledger first
        while stopped and scheduler.live_jobs([str(job)]) and time.monotonic() < deadline:
            time.sleep(0.5)
    elif _local_alive(record):
        pid = int(record["pid"])
        with contextlib.suppress(OSError):
            if os.getpgid(pid) == pid:  # a detached controller leads its own group
                os.killpg(pid, signal.SIGTERM)
            else:
                os.kill(pid, signal.SIGTERM)
        done.append(f"controller pid {pid}: SIGTERM (its local point jobs stop with it)")
        stopped = True
    elif record.get("pid") and record.get("host") != socket.gethostname():
        done.append(
            f"controller pid {record['pid']} runs on {record.get('host')}, not here: run "
            f"this there, or: ssh {record.get('host')} kill {record['pid']}"
        )
    if stopped:
        sweep_files.write_controller(root, {**record, "state": "cancelled", "beat": time.time()})
    if controller_only:
        return done
    ledger = sweep_files.read_ledger(root, str(info.get("id", "")))
    slurm = {
        str(e["jobs"][-1]["job_id"])
        for e in ledger.values()
        if e.get("jobs") and e["jobs"][-1].get("executor") == "slurm"
    }
    live = sorted(scheduler.live_jobs(slurm)) if slurm else []
    if live:
        err = scheduler.scancel(live)
        done.append(f"point jobs {' '.join(live)}: scancel" + (f" ({err})" if err else ""))
    return done
