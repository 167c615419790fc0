"""The node's records of its workers, for the job summary: a private folder where
each worker leaves its record (``_wire.records``), plus what the agent reported (exit codes
and signals of workers that could not write an outcome, e.g. SIGKILL) and the frames where
the job's stop found each rank. Each node turns them into rows; in a multi-node job the
rows travel to node 0 through the job store. The same records tell the heartbeat which
ranks are alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from hydra_torchrun_callback._node.stack_service import harvest_stop_dumps
from hydra_torchrun_callback._report.frames import Frame, where
from hydra_torchrun_callback._report.job_summary import signal_name
from hydra_torchrun_callback._wire.protocol import RECORDS_ENV

__all__ = [
    "NodeRecords",
]


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
        """This node's records per worker slot (local rank), oldest first, keyed by the
        global rank of the slot's last process; and the node's latest attempt. A slot, not
        a rank: an elastic membership change renumbers the ranks (node 1's rank 1 becomes
        rank 0), and a rank's history is its slot's."""
        records = self.records()
        last = max((r["attempt"] for r in records), default=0)
        latest = [r for r in records if r["attempt"] == last]
        # virtual_local_rank gives every worker LOCAL_RANK=0: key by rank, as before.
        field = (
            "local_rank"
            if len({r.get("local_rank") for r in latest}) == len({r["rank"] for r in latest})
            else "rank"
        )
        by_slot: dict[int, list[dict[str, Any]]] = {}
        for record in records:
            by_slot.setdefault(int(record.get(field, record["rank"])), []).append(record)
        for recs in by_slot.values():
            recs.sort(key=lambda r: (r["attempt"], r["started"]))
        last_attempt = max((recs[-1]["attempt"] for recs in by_slot.values()), default=0)
        return {recs[-1]["rank"]: recs for recs in by_slot.values()}, last_attempt

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
        outcome = self._ended(record, now)
        outcome["rank"] = record["rank"]  # it may differ from the slot's rank now (elastic)
        return outcome

    def _ended(self, record: dict[str, Any], now: float) -> dict[str, Any]:
        status, detail = record["status"], record["detail"]
        ended = record["ended"]
        if status == "running":  # the process never reported an outcome
            exitcode = self.exit_codes.get(record["pid"])
            if exitcode is not None and exitcode < 0:
                status, detail = "killed", signal_name(-exitcode)
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
