"""The job summary: who ran where and how it ended, one row per global rank.

Each worker leaves a small record (rank, pid, attempt, start, end, outcome) in a
private folder of its node's Hydra process; the agent's failure report adds exit
codes and signals for workers that could not write an outcome (SIGKILL). Each
node turns its records into rows; in a multi-node job the rows travel to node 0
through the job store. Node 0 logs one table and saves it as JSON beside
``.hydra/``, so a sweep can be inspected afterwards.

The same records tell a heartbeat thread which ranks are alive.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from hydra_torchrun_callback._files import write_text_atomic
from hydra_torchrun_callback._protocol import RECORDS_ENV, SUMMARY_FILE
from hydra_torchrun_callback._stacks import (
    Frame,
    group_by_frame,
    harvest_stop_dumps,
    rank_label,
    where,
)

__all__ = [
    "SUMMARY_FILE",
    "Heartbeat",
    "NodeRecords",
    "WorkerRecord",
    "build_summary",
    "render_table",
    "write_summary",
]

log = logging.getLogger("hydra_torchrun_callback")

#: A rank's outcome detail ("ValueError: boom") is cut to this many characters.
_MAX_DETAIL = 1000


# -- worker side -----------------------------------------------------------------
class WorkerRecord:
    """This worker's record: written when it starts and again when its task ends."""

    def __init__(self, env: Mapping[str, str]) -> None:
        folder = env.get(RECORDS_ENV)
        self.path = Path(folder) / f"{env.get('RANK', '0')}-{os.getpid()}.json" if folder else None
        self.data: dict[str, Any] = {
            "rank": int(env.get("RANK", 0)),
            "local_rank": int(env.get("LOCAL_RANK", 0)),
            "pid": os.getpid(),
            "attempt": int(env.get("TORCHELASTIC_RESTART_COUNT", 0)),
            "started": time.time(),
            # faulthandler names threads by this ident: it finds the main thread's frames.
            "main_thread": threading.main_thread().ident,
            "log": None,
            "ended": None,
            "status": "running",
            "detail": "",
        }
        self._write()

    def note(self, **fields: Any) -> None:
        self.data.update(fields)
        self._write()

    def finish(self, status: str, detail: str = "") -> None:
        # One line of a table: the full text is in the root cause and the rank's log.
        if len(detail) > _MAX_DETAIL:
            detail = detail[: _MAX_DETAIL - 3] + "..."
        self.data.update(ended=time.time(), status=status, detail=detail)
        self._write()

    def _write(self) -> None:
        if self.path is None:
            return
        with contextlib.suppress(OSError):  # the summary must never fail the task
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data))
            os.replace(tmp, self.path)


# -- node side (the Hydra process that hosts the agent) ----------------------------
def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return state not in ("Z", "X")


class NodeRecords:
    """A private folder for this node's worker records, and what the agent reported."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="hydra_torchrun_rec_")
        #: worker pid -> exit code, for workers that failed (from the agent's reports).
        self.exit_codes: dict[int, int] = {}
        #: (rank, pid) -> its main thread's frames when the job stopped it.
        self.stop_frames: dict[tuple[int, int], list[Frame]] = {}

    @property
    def env(self) -> dict[str, str]:
        return {RECORDS_ENV: self.dir}

    def note_failures(self, failures: Mapping[int, Any]) -> None:
        """torch's ``ChildFailedError.failures`` (rank -> ProcessFailure)."""
        for failure in failures.values():
            self.exit_codes[int(failure.pid)] = int(failure.exitcode)

    def records(self) -> list[dict[str, Any]]:
        found = []
        for path in Path(self.dir).glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                found.append(json.loads(path.read_text()))
        return found

    def _by_rank(self) -> tuple[dict[int, list[dict[str, Any]]], int]:
        """This node's records per rank, oldest first, and the node's latest attempt."""
        by_rank: dict[int, list[dict[str, Any]]] = {}
        for record in self.records():
            by_rank.setdefault(record["rank"], []).append(record)
        for recs in by_rank.values():
            recs.sort(key=lambda r: (r["attempt"], r["started"]))
        last_attempt = max((recs[-1]["attempt"] for recs in by_rank.values()), default=0)
        return by_rank, last_attempt

    def live(self) -> list[dict[str, Any]]:
        """Records of this node's workers of the latest attempt that are running now."""
        by_rank, last_attempt = self._by_rank()
        return [
            recs[-1]
            for recs in by_rank.values()
            if recs[-1]["attempt"] == last_attempt
            and recs[-1]["status"] == "running"
            and _pid_alive(recs[-1]["pid"])
        ]

    def harvest_stacks(self) -> None:
        """Once the workers are gone: append the stacks they dumped when they were stopped
        to their logs, and keep where each main thread was for the summary."""
        self.stop_frames.update(harvest_stop_dumps(self.dir, self.records()))

    def rank_states(self) -> dict[int, str]:
        """Each rank's state in the node's latest attempt: alive, ended or starting
        (no process of this attempt has started its task yet)."""
        by_rank, last_attempt = self._by_rank()
        states = {}
        for rank, recs in by_rank.items():
            r = recs[-1]
            if r["attempt"] < last_attempt:
                states[rank] = "starting"
            elif r["status"] == "running" and _pid_alive(r["pid"]):
                states[rank] = "alive"
            else:
                states[rank] = "ended"
        return states

    def rows(self, node_rank: int, host: str, now: Optional[float] = None) -> list[dict[str, Any]]:
        """One row per global rank that ran on this node, from its last process."""
        now = time.time() if now is None else now
        # The agent restarts the whole group, so every rank had as many attempts as the
        # node's latest one; a process stopped before its task began left no record.
        by_rank, last_attempt = self._by_rank()
        rows = []
        for rank, recs in sorted(by_rank.items()):
            seen = {r["attempt"] for r in recs}
            history = [self._outcome(r, now) for r in recs] + [
                {
                    "attempt": attempt,
                    "pid": None,
                    "status": "stopped",
                    "detail": "stopped before its task started",
                    "wall_s": 0.0,
                }
                for attempt in range(last_attempt + 1)
                if attempt not in seen
            ]
            history.sort(key=lambda h: h["attempt"])
            last = history[-1]
            frames = self.stop_frames.get((rank, recs[-1]["pid"]))
            rows.append(
                {
                    "rank": rank,
                    "local_rank": recs[-1]["local_rank"],
                    "node": node_rank,
                    "host": host,
                    "pid": last["pid"],
                    "attempts": last_attempt + 1,
                    "status": last["status"],
                    "detail": last["detail"],
                    "wall_s": last["wall_s"],
                    # Where its main thread was when the job stopped it (None: not stopped).
                    "stopped_in": where(frames) if frames is not None else None,
                    "frame": frames[0].as_dict() if frames else None,
                    "history": history[:-1],
                }
            )
        return rows

    def _outcome(self, record: dict[str, Any], now: float) -> dict[str, Any]:
        status, detail = record["status"], record["detail"]
        ended = record["ended"]
        if status == "running":  # the process never reported an outcome
            exitcode = self.exit_codes.get(record["pid"])
            if exitcode is not None and exitcode < 0:
                status, detail = "killed", _signal_name(-exitcode)
            elif exitcode is not None:
                status, detail = "exited", f"exit code {exitcode}"
            else:
                status, detail = "stopped", "stopped by the agent before it finished"
            ended = now
        return {
            "attempt": record["attempt"],
            "pid": record["pid"],
            "status": status,
            "detail": detail,
            "wall_s": round(max(float(ended) - float(record["started"]), 0.0), 3),
        }

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# -- the job's summary (node 0) ---------------------------------------------------------
def build_summary(
    rows: Iterable[dict[str, Any]],
    *,
    run_id: str,
    nnodes: int,
    nproc_per_node: int,
    wall_s: float,
    error: Optional[BaseException] = None,
    missing_nodes: Iterable[int] = (),
) -> dict[str, Any]:
    """The JSON-ready summary; the root cause's row is marked."""
    ordered = sorted(rows, key=lambda r: r["rank"])
    root_rank = getattr(error, "rank", None)
    # An exception may have no message at all (torch's RendezvousClosedError()).
    root_text = (str(error).splitlines() or [type(error).__name__])[0] if error else None
    if isinstance(error, SystemExit) and isinstance(error.code, int) and error.code > 128:
        root_text = f"stopped by {_signal_name(error.code - 128)} (exit status {error.code})"
    for row in ordered:
        is_root = root_rank is not None and row["rank"] == root_rank
        row["root_cause"] = error_line(row) if is_root else None
    if error is None:
        status = "COMPLETED"
    elif isinstance(error, (KeyboardInterrupt, SystemExit)):
        status = "INTERRUPTED"
    else:
        status = "FAILED"
    return {
        "status": status,
        "run_id": run_id,
        "nnodes": nnodes,
        "nproc_per_node": nproc_per_node,
        "world_size": nnodes * nproc_per_node,
        "wall_s": round(wall_s, 3),
        "root_cause": root_text,
        "root_cause_rank": root_rank,
        "missing_nodes": sorted(missing_nodes),
        "ranks": ordered,
    }


def error_line(row: Mapping[str, Any]) -> str:
    """What a failed rank did, in a few words ("ValueError: boom", "SIGKILL")."""
    return str(row["detail"]) or str(row["status"])


def _status_cell(row: Mapping[str, Any]) -> str:
    status = str(row["status"])
    if status == "raised":
        return "raised " + str(row["detail"]).split(":", 1)[0]
    if status == "killed":
        return f"killed ({row['detail']})"
    if status == "exited":
        return str(row["detail"])
    return status


def format_columns(
    columns: Sequence[str], lines: Sequence[Sequence[str]], right: Container[int] = ()
) -> list[str]:
    """Header and rows as fixed-width text, two spaces apart; ``right``: right-aligned."""
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(columns)]
    return [
        "  ".join(
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ).rstrip()
        for cells in [columns, *lines]
    ]


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def render_table(summary: Mapping[str, Any]) -> str:
    """The summary as a fixed-width text table (one line per rank)."""
    head = (
        f"torchrun job summary: {summary['status']} in {summary['wall_s']:.1f}s, "
        f"{summary['nnodes']} node(s) x {summary['nproc_per_node']} worker(s), "
        f"run id {summary['run_id']}"
    )
    columns: tuple[str, ...] = (
        "rank",
        "node",
        "host",
        "pid",
        "attempts",
        "exit status",
        "wall",
        "root cause",
    )
    stopped = {r["rank"]: r["stopped_in"] for r in summary["ranks"] if r.get("stopped_in")}
    if stopped:
        columns += ("stopped in",)
    lines = []
    for row in summary["ranks"]:
        cells: tuple[str, ...] = (
            str(row["rank"]),
            str(row["node"]),
            clip(str(row["host"]), 24),
            "-" if row["pid"] is None else str(row["pid"]),
            str(row["attempts"]),
            clip(_status_cell(row), 28),
            f"{row['wall_s']:.1f}s",
            clip(str(row["root_cause"] or ""), 60),
        )
        if stopped:
            cells += (clip(str(row.get("stopped_in") or ""), 70),)
        lines.append(cells)
    out = [head, *format_columns(columns, lines, right={0, 1, 3, 4, 6})]
    if stopped:
        out.append("where the ranks were when the job stopped them (stacks in each rank's log):")
        for ranks, text in group_by_frame(stopped):
            out.append(f"  {rank_label(ranks)}: {text}")
    for row in summary["ranks"]:
        for past in row.get("history", ()):
            if past["status"] in ("raised", "killed", "exited"):
                out.append(
                    f"rank {row['rank']} attempt {past['attempt']} (pid {past['pid']}): "
                    f"{clip(_status_cell(past), 40)} after {past['wall_s']:.1f}s, restarted"
                )
    if summary["missing_nodes"]:
        out.append(f"nodes {summary['missing_nodes']} sent no report (lost before the end)")
    if summary["root_cause"] and summary["root_cause_rank"] is None:
        out.append(f"root cause: {summary['root_cause']}")
    return "\n".join(out)


def write_summary(summary: Mapping[str, Any], output_dir: str) -> Optional[Path]:
    """Save the summary beside ``.hydra/``; a failure to write is logged, not raised."""
    path = Path(output_dir) / SUMMARY_FILE
    try:
        write_text_atomic(path, json.dumps(summary, indent=2) + "\n")
    except OSError as exc:
        log.warning("could not save the job summary to %s: %s", path, exc)
        return None
    return path


def rank_ranges(ranks: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    ordered = sorted(set(ranks))
    parts: list[str] = []
    start = prev = None
    for rank in [*ordered, None]:
        if rank is not None and prev is not None and rank == prev + 1:
            prev = rank
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = rank
    return ",".join(parts) or "none"


class Heartbeat:
    """Log, every ``interval`` seconds, which ranks are alive (a one-line report)."""

    def __init__(
        self, interval: float, world_size: int, states: Callable[[], Mapping[int, str]]
    ) -> None:
        self.interval = interval
        self.world_size = world_size
        self.states = states
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="torchrun-heartbeat", daemon=True)

    def line(self) -> str:
        states = self.states()
        alive = [r for r, state in states.items() if state == "alive"]
        ended = [r for r, state in states.items() if state == "ended"]
        starting = [r for r in range(self.world_size) if states.get(r, "starting") == "starting"]
        text = (
            f"torchrun heartbeat: {len(alive)}/{self.world_size} ranks alive "
            f"[{rank_ranges(alive)}] after {time.monotonic() - self.started:.0f}s"
        )
        if starting:
            text += f"; starting: [{rank_ranges(starting)}]"
        if ended:
            text += f"; ended: [{rank_ranges(ended)}]"
        return text

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):  # a report, never a reason to fail
                log.info("%s", self.line())

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
